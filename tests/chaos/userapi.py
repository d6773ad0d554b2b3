"""The researcher's side of a campaign: the server's REST API with the root user's token.

A campaign creates hundreds of tasks; the vantage6 user client (``tests/peers/v6client``)
makes several requests per task behind one serial RPC worker, which on this loaded VM
made task creation the campaign's bottleneck. This client makes the one request each
action needs (``POST task``, ``POST kill/task``, paged ``GET``), with the same JSON a
vantage6 4.x client sends for an unencrypted collaboration (the input is base64 of its
JSON). It is synchronous and meant to be called through ``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any


class UserApi:
    """A logged-in user of one server; logs in again when its token is refused."""

    def __init__(self, *, api_url: str, username: str, password: str) -> None:
        self._api_url = api_url.rstrip("/")
        self._credentials = {"username": username, "password": password}
        self._token: str | None = None

    def create_task(
        self,
        *,
        collaboration: int,
        organization: int,
        name: str,
        image: str,
        input_: dict[str, Any],
    ) -> dict[str, Any]:
        encoded = base64.b64encode(json.dumps(input_).encode()).decode()
        body = {
            "name": name,
            "description": "",
            "image": image,
            "collaboration_id": collaboration,
            "organizations": [{"id": organization, "input": encoded}],
            "databases": [{"label": "default"}],
        }
        created = self.request("POST", "task", body)
        if "id" not in created:
            raise RuntimeError(f"the server did not create task {name!r}: {created}")
        return created

    def kill_task(self, task: int) -> dict[str, Any]:
        return self.request("POST", "kill/task", {"id": task})

    def all(self, what: str, **params: int) -> list[dict[str, Any]]:
        """Every item of a listing (``run``, ``result``, ``task``), page by page."""
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            query = "&".join(
                f"{k}={v}" for k, v in {**params, "page": page, "per_page": 200}.items()
            )
            data = self.request("GET", f"{what}?{query}").get("data", [])
            items += data
            if len(data) < 200:
                return items
            page += 1

    def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        if self._token is None:
            self._login()
        try:
            return self._send(method, path, body)
        except urllib.error.HTTPError as exc:
            if exc.code != 401:
                return _body_of(exc)
        self._login()
        try:
            return self._send(method, path, body)
        except urllib.error.HTTPError as exc:
            return _body_of(exc)

    def _login(self) -> None:
        answer = self._send("POST", "token/user", self._credentials, authorized=False)
        self._token = str(answer["access_token"])

    def _send(
        self, method: str, path: str, body: Any, *, authorized: bool = True
    ) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if authorized and self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(
            f"{self._api_url}/{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers=headers,
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        return answer if isinstance(answer, dict) else {"data": answer}


def _body_of(error: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        answer = json.load(error)
    except ValueError:
        answer = {}
    return {"status": error.code, **(answer if isinstance(answer, dict) else {})}
