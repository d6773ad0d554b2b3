"""The lowest layer: small pieces every other package may use, importing none of them.

``node/``, ``executors/``, ``proxy/`` and ``policies/`` each need a logger, a backoff for
reconnect and retry loops, and a name for decoded JSON; defined once here, they mean the
same thing everywhere. Nothing in this package knows about runs, runtimes, the server or
the proxy, and it imports no other fednode package (the import contract in
``pyproject.toml`` checks it).
"""
