"""The release protocol's two hot requests answered beneath the framework's per-request layers.

A boot storm is challenges and releases: every instance asks for a nonce (``POST /v1/release/challenge``),
then for its key (``POST /v1/release``). FastAPI's routing, dependency solving and response validation cost
more than the nonce does, and a tenth of a release's work. Each lane is an ASGI layer inside the middlewares
every answer goes through (security headers, body limits, metrics under the route's template, the sealed
guard) that answers its one route itself, with what the route makes:

- :class:`ChallengeLane` through :func:`keysteward.server.routers.release.challenge_out`;
- :class:`ReleaseLane` through :func:`keysteward.server.routers.release.release_answer`, after validating
  the body as FastAPI would (the JSON decoded, then the model validated from it, as Python values).
  A request it does not take as it stands goes to the framework untouched, its body replayed: another
  content type, a body that is not JSON or does not validate (refused there with the usual 422). Nothing
  has been read, decided or written by then. Refusals are answered as the app's exception handlers answer
  them (:mod:`keysteward.server.problems`).

The routes stay registered for the OpenAPI description. Every other request passes through untouched.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.routing import BaseRoute

from keysteward.errors import KeystewardError
from keysteward.release.nonces import Nonces
from keysteward.server import problems
from keysteward.server.release_schemas import PendingOut, ReleaseIn
from keysteward.server.routers.release import challenge_out, release_answer
from keysteward.server.services import Services

CHALLENGE_PATH = "/v1/release/challenge"
RELEASE_PATH = "/v1/release"
_JSON = b"application/json"
_HEADERS = (b"content-type", _JSON)


async def _send(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _answer(send: Any, status: int, body: bytes) -> None:
    """A JSON answer, as the routes' models give it."""
    await _send(send, status, [_HEADERS, (b"content-length", str(len(body)).encode())], body)


class ChallengeLane:
    def __init__(self, app: Any, nonces: Nonces, route: BaseRoute) -> None:
        self.app = app
        self.nonces = nonces
        self.route = route

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != CHALLENGE_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # what the metrics label the request with, as routing would
        await _answer(send, 200, challenge_out(self.nonces).model_dump_json().encode())


def _is_json(scope: Any) -> bool:
    """The content type is JSON's, the one body FastAPI decodes as JSON that this lane takes."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return bool(value.split(b";", 1)[0].strip().lower() == _JSON)
    return False


class ReleaseLane:
    def __init__(self, app: Any, svc: Services, route: BaseRoute) -> None:
        self.app = app
        self.svc = svc
        self.route = route

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != RELEASE_PATH or scope["method"] != "POST" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        body, complete = await _read_body(receive)
        if not complete:
            return  # the client went away before its body arrived: nobody to answer
        try:
            asked = ReleaseIn.model_validate(json.loads(body))
        except (ValueError, ValidationError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            await self.app(scope, _replay(body, receive), send)  # FastAPI's own 422, as for any route
            return
        scope["route"] = self.route  # what the metrics label the request with, as routing would
        request = Request(scope, receive)
        try:
            answer = await release_answer(self.svc, request, asked)
        except Exception as exc:  # noqa: BLE001 - answered as the app's exception handlers answer it
            if isinstance(exc, KeystewardError):
                response = problems.for_error(request, exc)
            else:
                response = problems.for_unexpected(request, exc)
            await _send(send, response.status_code, response.raw_headers, bytes(response.body))
            return
        status = 202 if isinstance(answer, PendingOut) else 200
        await _answer(send, status, answer.model_dump_json().encode())


async def _read_body(receive: Any) -> tuple[bytes, bool]:
    """The request's whole body (the body limit outside has bounded it), and whether it all arrived."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"", False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives ``body`` once, then whatever the connection says next (a disconnect)."""
    sent = False

    async def replayed() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
