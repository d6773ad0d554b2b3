"""A stand-in for Keycloak, just large enough for vantage6 5.0.0a26 (server and node).

vantage6 5 hands authentication to Keycloak: the server reads the realm's public key once
at start and verifies every RS256 token locally; it creates a Keycloak client per node and
a Keycloak user per user through the admin API (python-keycloak); a node logs in with
``client_credentials`` as ``<name>-node-client`` and reads the realm's key on every token.
Keycloak itself (a Java server) is not installable here, so this plays the handful of
endpoints those calls reach — and nothing else (``404`` names what it does not know).
It is a **named fake**: it is used only by ``benchmarks/v5node_compare.py``, never by a
test of fednode, and it checks client secrets and passwords but is no identity provider.

Endpoints (``{r}`` = any realm name; all state in one realm):

* ``GET /realms/{r}`` — ``public_key`` (base64 DER SubjectPublicKeyInfo);
* ``POST /realms/{r}/protocol/openid-connect/token`` — grants ``client_credentials`` (a
  client with a service account; the token's ``sub`` is that account's user id) and
  ``password`` (a user's password, any known client);
* under ``/admin/realms/{r}/`` with an admin client's token: ``users`` (list with
  ``username``/``exact``/``first``/``max``, create, delete), ``clients`` (list with
  ``clientId``, get, create, delete), ``clients/{id}/client-secret`` (GET reads it, POST
  makes a new one).

Tokens carry what the server reads: ``sub``, ``exp``, ``iat`` and the claim
``vantage6_client_type`` (``user``/``node``) that a client's hard-coded-claim mapper
sets. The RSA key and the users and clients live in ``--state`` (a directory) so that a
restart keeps them: the server caches the key for its lifetime.

    python oidc_standin.py --port 8089 --state DIR [--token-seconds 300]

Seeded: the admin client (``--admin-client``/``--admin-secret``), the user ``admin``
with password ``admin`` (the server's super user), and ``public_client`` (no secret) for
password logins from scripts.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

MAX_BODY = 1 << 20


class Reply(Exception):
    """An HTTP answer other than the handler's normal one (errors, mostly)."""

    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


@dataclass
class Realm:
    """The users, clients and signing key, persisted as ``db.json`` + ``key.pem``."""

    state: Path
    key: RSAPrivateKey
    db: dict[str, dict[str, dict[str, Any]]]
    token_seconds: int
    admin_client: str
    lock: threading.RLock

    @classmethod
    def open(
        cls, state: Path, *, token_seconds: int, admin_client: str, admin_secret: str
    ) -> Realm:
        state.mkdir(parents=True, exist_ok=True)
        key_file = state / "key.pem"
        if key_file.exists():
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            assert isinstance(key, RSAPrivateKey)
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            key_file.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        db_file = state / "db.json"
        db = json.loads(db_file.read_text()) if db_file.exists() else {"users": {}, "clients": {}}
        realm = cls(state, key, db, token_seconds, admin_client, threading.RLock())
        if not realm.client_named(admin_client):
            realm.add_client(admin_client, secret=admin_secret, service_account=True, kind=None)
        if not realm.user_named("admin"):
            realm.add_user("admin", password="admin")
        if not realm.client_named("public_client"):
            realm.add_client("public_client", secret=None, service_account=False, kind="user")
        return realm

    def save(self) -> None:
        (self.state / "db.json").write_text(json.dumps(self.db, indent=1))

    def public_key_b64(self) -> str:
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    # -- users and clients ----------------------------------------------------------------

    def user_named(self, name: str) -> dict[str, Any] | None:
        return next((u for u in self.db["users"].values() if u["username"] == name.lower()), None)

    def client_named(self, client_id: str) -> dict[str, Any] | None:
        return next((c for c in self.db["clients"].values() if c["clientId"] == client_id), None)

    def add_user(self, name: str, *, password: str | None) -> str:
        if self.user_named(name):
            raise Reply(409, {"errorMessage": "User exists with same username"})
        uid = str(uuid.uuid4())
        self.db["users"][uid] = {
            "id": uid,
            "username": name.lower(),
            "enabled": True,
            "pw": password,
        }
        self.save()
        return uid

    def add_client(
        self, client_id: str, *, secret: str | None, service_account: bool, kind: str | None
    ) -> str:
        if self.client_named(client_id):
            raise Reply(409, {"errorMessage": f"Client {client_id} already exists"})
        cid = str(uuid.uuid4())
        account = (
            self.add_user(f"service-account-{client_id}", password=None)
            if service_account
            else None
        )
        self.db["clients"][cid] = {
            "id": cid,
            "clientId": client_id,
            "publicClient": secret is None,
            "serviceAccountsEnabled": service_account,
            "secret": secret,
            "account": account,
            "kind": kind,
        }
        self.save()
        return cid

    def client(self, cid: str) -> dict[str, Any]:
        found = self.db["clients"].get(cid)
        if found is None:
            raise Reply(404, {"error": "Could not find client"})
        return found

    @staticmethod
    def client_view(client: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in client.items() if k not in ("secret", "account", "kind")}

    @staticmethod
    def user_view(user: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in user.items() if k != "pw"}

    # -- tokens ---------------------------------------------------------------------------

    def mint(
        self, *, sub: str, client_id: str, kind: str | None, username: str, issuer: str
    ) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer,
            "sub": sub,
            "aud": "account",
            "azp": client_id,
            "client_id": client_id,
            "typ": "Bearer",
            "iat": now,
            "exp": now + self.token_seconds,
            "jti": str(uuid.uuid4()),
            "scope": "openid profile email",
            "preferred_username": username,
        }
        if kind:
            claims["vantage6_client_type"] = kind
        token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "standin"})
        return {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.token_seconds,
            "refresh_expires_in": 0,
            "not-before-policy": 0,
            "scope": claims["scope"],
        }

    def grant(self, form: dict[str, str], *, issuer: str) -> dict[str, Any]:
        client = self.client_named(form.get("client_id", ""))
        if client is None:
            raise Reply(401, {"error": "invalid_client"})
        confidential = not client["publicClient"]
        if confidential and not secrets.compare_digest(
            str(client["secret"]), form.get("client_secret", "")
        ):
            raise Reply(401, {"error": "unauthorized_client"})
        grant = form.get("grant_type")
        if grant == "client_credentials" and confidential and client["account"]:
            user = self.db["users"][client["account"]]
            return self.mint(
                sub=user["id"],
                client_id=client["clientId"],
                kind=client["kind"],
                username=user["username"],
                issuer=issuer,
            )
        if grant == "password":
            user = self.user_named(form.get("username", ""))
            if user is None or user["pw"] is None or user["pw"] != form.get("password"):
                raise Reply(401, {"error": "invalid_grant"})
            return self.mint(
                sub=user["id"],
                client_id=client["clientId"],
                kind="user",
                username=user["username"],
                issuer=issuer,
            )
        raise Reply(400, {"error": "unsupported_grant_type"})

    def is_admin(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer":
            return False
        try:
            claims = jwt.decode(
                token, self.key.public_key(), algorithms=["RS256"], options={"verify_aud": False}
            )
        except jwt.PyJWTError:
            return False
        return bool(claims.get("azp") == self.admin_client)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    realm: Realm  # set on the subclass the server is made with
    log_file: Path

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        query = dict(parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._answer(413, {"error": "body too large"})
            return
        body = self.rfile.read(length) if length else b""
        try:
            with self.realm.lock:
                status, payload, headers = self._route(method, parts, query, body)
        except Reply as reply:
            status, payload, headers = reply.status, reply.body, reply.headers
        self._answer(status, payload, headers)

    def _answer(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        with self.realm.lock, self.log_file.open("a") as log:
            log.write(f"{time.time():.3f} {self.command} {self.path} {status}\n")

    def _base(self) -> str:
        return f"http://{self.headers.get('Host', '127.0.0.1')}"

    def _route(
        self, method: str, parts: list[str], query: dict[str, str], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        realm = self.realm
        if len(parts) == 2 and parts[0] == "realms" and method == "GET":
            issuer = f"{self._base()}/realms/{parts[1]}"
            return (
                200,
                {
                    "realm": parts[1],
                    "public_key": realm.public_key_b64(),
                    "token-service": f"{issuer}/protocol/openid-connect",
                    "account-service": f"{issuer}/account",
                    "tokens-not-before": 0,
                },
                {},
            )
        if parts[:1] == ["realms"] and parts[2:] == ["protocol", "openid-connect", "token"]:
            form = dict(parse_qsl(body.decode()))
            basic = self.headers.get("Authorization", "")
            if "client_id" not in form and basic.startswith("Basic "):
                cid, _, secret = base64.b64decode(basic[6:]).decode().partition(":")
                form.update(client_id=cid, client_secret=secret)
            return 200, realm.grant(form, issuer=f"{self._base()}/realms/{parts[1]}"), {}
        if parts[:2] != ["admin", "realms"] or len(parts) < 4:
            raise Reply(404, {"error": f"not played by the stand-in: {method} {self.path}"})
        if not realm.is_admin(self.headers.get("Authorization", "")):
            raise Reply(401, {"error": "HTTP 401 Unauthorized"})
        location = f"{self._base()}/admin/realms/{parts[2]}/{parts[3]}"
        return self._admin(method, parts[3], parts[4:], query, body, location)

    def _admin(
        self,
        method: str,
        kind: str,
        rest: list[str],
        query: dict[str, str],
        body: bytes,
        location: str,
    ) -> tuple[int, Any, dict[str, str]]:
        realm = self.realm
        rep: dict[str, Any] = json.loads(body) if body else {}
        if kind == "users":
            if method == "GET" and not rest:
                users = list(realm.db["users"].values())
                if "username" in query:
                    name = query["username"].lower()
                    exact = query.get("exact", "false").lower() == "true"
                    users = [
                        u
                        for u in users
                        if (u["username"] == name if exact else name in u["username"])
                    ]
                first, most = int(query.get("first", 0)), int(query.get("max", 100))
                return 200, [realm.user_view(u) for u in users[first : first + most]], {}
            if method == "POST" and not rest:
                password = next(
                    (
                        c.get("value")
                        for c in rep.get("credentials", [])
                        if c.get("type") == "password"
                    ),
                    None,
                )
                uid = realm.add_user(rep["username"], password=password)
                return 201, None, {"Location": f"{location}/{uid}"}
            if method == "DELETE" and len(rest) == 1 and realm.db["users"].pop(rest[0], None):
                realm.save()
                return 204, None, {}
        if kind == "clients":
            if method == "GET" and not rest:
                found = [
                    c
                    for c in realm.db["clients"].values()
                    if "clientId" not in query or c["clientId"] == query["clientId"]
                ]
                return 200, [realm.client_view(c) for c in found], {}
            if method == "GET" and len(rest) == 1:
                return 200, realm.client_view(realm.client(rest[0])), {}
            if method == "POST" and not rest:
                claim = None
                for mapper in rep.get("protocolMappers", []):
                    config = mapper.get("config", {})
                    if config.get("claim.name") == "vantage6_client_type":
                        claim = config.get("claim.value")
                public = bool(rep.get("publicClient", False))
                cid = realm.add_client(
                    rep["clientId"],
                    secret=None if public else secrets.token_hex(16),
                    service_account=bool(rep.get("serviceAccountsEnabled", False)),
                    kind=claim,
                )
                return 201, None, {"Location": f"{location}/{cid}"}
            if method == "DELETE" and len(rest) == 1:
                client = realm.client(rest[0])
                del realm.db["clients"][client["id"]]
                if client["account"]:
                    realm.db["users"].pop(client["account"], None)
                realm.save()
                return 204, None, {}
            if len(rest) == 2 and rest[1] == "client-secret":
                client = realm.client(rest[0])
                if method == "POST":
                    client["secret"] = secrets.token_hex(16)
                    realm.save()
                return 200, {"type": "secret", "value": client["secret"]}, {}
        raise Reply(404, {"error": f"not played by the stand-in: {method} admin {kind} {rest}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--token-seconds", type=int, default=300)
    parser.add_argument("--admin-client", default="v6-admin")
    parser.add_argument("--admin-secret", default="admin-secret")
    args = parser.parse_args()
    realm = Realm.open(
        args.state,
        token_seconds=args.token_seconds,
        admin_client=args.admin_client,
        admin_secret=args.admin_secret,
    )
    handler = type(
        "RealmHandler", (Handler,), {"realm": realm, "log_file": args.state / "requests.log"}
    )
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    server.daemon_threads = True
    print(f"oidc stand-in on 127.0.0.1:{args.port}, state {args.state}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
