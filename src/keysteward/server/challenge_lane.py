"""The release challenge answered beneath the framework's per-request layers.

Half of a boot storm's requests are challenges (``POST /v1/release/challenge``): a fresh nonce, nothing
read, nothing written, nothing decided. FastAPI's routing, dependency solving and response validation cost
more than the nonce does. :class:`ChallengeLane` is an ASGI layer inside the middlewares every answer goes
through (security headers, body limits, metrics under the route's template, the sealed guard) that answers
that one route itself, with the answer the route makes (:func:`keysteward.server.routers.release.challenge_out`);
the route stays registered for the OpenAPI description. Every other
request passes through untouched.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute

from keysteward.release.nonces import Nonces
from keysteward.server.routers.release import challenge_out

PATH = "/v1/release/challenge"
_HEADERS = (b"content-type", b"application/json")


class ChallengeLane:
    def __init__(self, app: Any, nonces: Nonces, route: BaseRoute) -> None:
        self.app = app
        self.nonces = nonces
        self.route = route

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # what the metrics label the request with, as routing would
        body = challenge_out(self.nonces).model_dump_json().encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [_HEADERS, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
