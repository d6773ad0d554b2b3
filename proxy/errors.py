"""Errors the proxy answers with: a status and a vantage6-style ``{"msg": ...}`` body.

Handlers and middlewares raise :class:`ProxyError`; the outermost middleware turns it
(and aiohttp's own HTTP errors, e.g. 413 from reading an oversized body) into JSON, so an
algorithm always gets the same shape of error the vantage6 server gives.
"""

from __future__ import annotations

from aiohttp import web


class ProxyError(Exception):
    """A refusal or failure with the HTTP status the algorithm should see."""

    def __init__(
        self,
        status: int,
        msg: str,
        *,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        """``close``: the connection is closed after this answer (no keep-alive)."""
        super().__init__(msg)
        self.status = status
        self.msg = msg
        self.headers = headers
        self.close = close

    def response(self) -> web.Response:
        response = error_response(self.status, self.msg, headers=self.headers)
        if self.close:
            response.force_close()
        return response


def error_response(status: int, msg: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"msg": msg}, status=status, headers=headers)
