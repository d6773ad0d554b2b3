"""Start the real vantage6-server 4.15.2 from a config file: the test peer's entry point.

Runs inside the v6server venv (``scripts/v6server-setup``), never inside fednode's.
``tests/peers/v6server.py`` starts it as a subprocess and stops it with SIGTERM.

Usage::

    python launch.py --config server.yaml --host 127.0.0.1 --port 7601
    python launch.py --check     # import the server (with the shim) and exit

The root user's password is taken from ``V6_INIT_SUPER_PASS`` (plain text; hashed here
into ``V6_INIT_SUPER_PASS_HASHED``, which the server reads on its first start only).
"""

from __future__ import annotations

import argparse
import enum
import os
import sys


def _format_like_python310(self: enum.Enum, format_spec: str) -> str:
    """``Enum.__format__`` as it behaved up to Python 3.10.

    Why this exists: vantage6 4.x supports Python 3.10 only. Its permission system builds
    rule attribute names with f-strings over ``(str, Enum)`` members, e.g.
    ``f"{operation}_{scope}"`` expecting ``"c_glo"``. Python 3.11 changed
    ``Enum.__format__`` for mixed-in enums to use ``Enum.__str__`` (``"Operation.CREATE"``),
    so every permission lookup fails (``'RuleCollection' object has no attribute 'c_glo'``,
    HTTP 500 on e.g. ``POST /api/organization``). Restoring the 3.10 rule — format the
    member's *value* unless the enum overrides ``__str__`` — fixes it. It must be patched
    before ``vantage6.server`` is imported (the rule names are built at import and
    request time alike; patching first covers both).
    """
    plain_str = type(self).__str__ in (enum.Enum.__str__, enum.Flag.__str__)
    if self._member_type_ is object or not plain_str:
        return str.__format__(str(self), format_spec)
    return self._member_type_.__format__(self._value_, format_spec)


def _apply_enum_shim() -> None:
    # On 3.10 this is the built-in behaviour already, so patching unconditionally is safe.
    enum.Enum.__format__ = _format_like_python310  # type: ignore[method-assign]


def _hash_root_password() -> None:
    plain = os.environ.pop("V6_INIT_SUPER_PASS", None)
    if plain is None or "V6_INIT_SUPER_PASS_HASHED" in os.environ:
        return
    import bcrypt

    hashed = bcrypt.hashpw(plain.encode(), bcrypt.gensalt()).decode()
    os.environ["V6_INIT_SUPER_PASS_HASHED"] = hashed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="server.yaml path")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7601)
    parser.add_argument("--check", action="store_true", help="import the server and exit")
    args = parser.parse_args()

    _apply_enum_shim()
    # Importing vantage6.server monkey-patches the stdlib for gevent; nothing before this
    # point may have started threads or opened sockets.
    from vantage6.server import run_dev_server, run_server

    if args.check:
        from vantage6.server import __version__ as version

        print(f"vantage6-server {version} imports fine on Python {sys.version.split()[0]}")
        return 0
    if not args.config:
        parser.error("--config is required")

    _hash_root_password()
    # run_server connects the database, creates tables, default roles and (first start)
    # the root organization and user; run_dev_server serves HTTP + socket.io with gevent.
    app = run_server(args.config, system_folders=False)
    run_dev_server(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
