"""The allow-list: every method and path the vantage6 4.x ``AlgorithmClient`` calls.

Read from ``vantage6/algorithm/client/__init__.py`` and the ``ClientBase`` it extends
(4.15.2). Anything else is refused with 403 by the guard (``proxy.middlewares.door``), so
an algorithm can read what it needs, create subtasks and fetch their results, and nothing
more: it cannot list users, patch runs, mint tokens, or touch another collaboration's
objects beyond what the server allows its container token anyway.

=======  ===============================  ==========================================
method   path                             AlgorithmClient
=======  ===============================  ==========================================
GET      /task/<id>                       ``task.get``
GET      /task/<id>/status                ``wait_for_results`` (polling)
POST     /task                            ``task.create`` (input encrypted per org)
GET      /result, /result/<id>            ``result.from_task``, ``result.get`` (decrypted)
GET      /run, /run/<id>                  ``run.from_task``, ``run.get`` (results decrypted)
GET      /organization, /organization/<id>  ``organization.list``/``get``, public keys
GET      /collaboration/<id>              ``collaboration.get``
GET      /study, /study/<id>              ``study.list``/``get``
GET      /vpn/algorithm/addresses         ``vpn.get_*`` (addresses rewritten to forwarders)
GET      /blobstream/status               ``check_if_blob_store_enabled`` (task.create)
GET      /blobstream/<uuid>, POST /blobstream   blob storage: 501, not supported yet
=======  ===============================  ==========================================
"""

from __future__ import annotations

from aiohttp import web

from proxy import handlers

PUBLIC_ROUTES = frozenset({"healthz"})

_ID = r"{id:\d+}"


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/healthz", handlers.healthz, name="healthz", allow_head=False)
    for path in (
        f"/task/{_ID}",
        f"/task/{_ID}/status",
        "/organization",
        f"/organization/{_ID}",
        f"/collaboration/{_ID}",
        "/study",
        f"/study/{_ID}",
        "/blobstream/status",
    ):
        router.add_get(path, handlers.forward, allow_head=False)
    router.add_get("/vpn/algorithm/addresses", handlers.peer_addresses, allow_head=False)
    router.add_post("/task", handlers.create_task)
    for path in ("/result", f"/result/{_ID}", "/run", f"/run/{_ID}"):
        router.add_get(path, handlers.read_results, allow_head=False)
    router.add_get(r"/blobstream/{uuid:[0-9a-fA-F-]{36}}", handlers.blob_storage, allow_head=False)
    router.add_post("/blobstream", handlers.blob_storage)
