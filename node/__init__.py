"""fednode's service: settings, composition root, server link, run lifecycle, CLI.

``node`` composes the other packages (``executors``, ``policies``, ``proxy``); they never
import it. See the module docstrings for how one run flows from the server to a result:
``node.app`` (start-up) → ``node.server.socket`` (events) → ``node.lifecycle`` (admit, start)
→ ``executors`` (the container) → ``node.lifecycle`` again (result upload).
"""

from importlib import metadata

try:
    __version__ = metadata.version("fednode")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
