"""``python -m node``: the same as the ``fednode`` command."""

from node.cli import app

app()
