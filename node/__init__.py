"""fednode's service: settings, composition root, server link, run lifecycle, CLI.

``node`` composes the other packages (``executors``, ``policies``, ``proxy``); they never
import it. See the module docstrings for how one run flows from the server to a result.
"""
