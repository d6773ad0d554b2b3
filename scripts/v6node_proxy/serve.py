"""Serve vantage6-node 4.15.2's own algorithm proxy exactly as that node serves it.

Runs in the v6node venv (``scripts/v6node-proxy-setup``), never in fednode's. It repeats
``Node.__proxy_server_worker`` (``vantage6/node/__init__.py``): the module-level Flask
``app`` of ``vantage6.node.proxy_server`` gets the node's ``NodeClient`` as ``SERVER_IO``
and the server's API base as ``server_url``, and a gevent ``WSGIServer`` serves it from a
daemon thread with the proxy's file logger as its access log. Like the node, nothing is
monkey-patched: ``requests`` calls block that thread while they wait for the server.

    serve.py --upstream http://127.0.0.1:PORT/api --port 7654 [--log FILE]
    serve.py --check        (import the proxy and exit: the setup script's smoke test)

Prints ``READY <port>`` on stdout once the socket accepts connections; runs until killed.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from urllib.parse import urlsplit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", help="the server's API base, e.g. http://127.0.0.1:5000/api")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7654)
    parser.add_argument("--log", default="/dev/null", help="the proxy's access/error log file")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()

    from gevent.pywsgi import WSGIServer
    from vantage6.common.client.node_client import NodeClient
    from vantage6.common.log import get_file_logger
    from vantage6.node import proxy_server

    if args.check:
        print("vantage6 node proxy importable:", proxy_server.__file__)
        return 0
    if not args.upstream:
        parser.error("--upstream is required")

    parts = urlsplit(args.upstream)
    client = NodeClient(f"{parts.scheme}://{parts.hostname}", parts.port, parts.path)
    proxy_server.app.config["SERVER_IO"] = client
    proxy_server.server_url = client.base_path
    proxy_log = get_file_logger("proxy_server", args.log, log_level_file=logging.INFO)

    def worker() -> None:  # Node.__proxy_server_worker, minus the port hunting
        WSGIServer((args.host, args.port), proxy_server.app, log=proxy_log).serve_forever()

    threading.Thread(target=worker, daemon=True).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection((args.host, args.port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        print("the proxy did not start listening", file=sys.stderr)
        return 1
    print(f"READY {args.port}", flush=True)
    while True:  # the node's main thread does its own work; here it only keeps the process
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
