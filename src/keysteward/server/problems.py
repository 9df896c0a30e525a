"""RFC 9457 problem+json for every error, with keysteward's stable codes; no tracebacks, no secrets."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from keysteward.errors import Denied, KeystewardError, RateLimited

log = logging.getLogger("keysteward.server")
PROBLEM = "application/problem+json"


_CHOICES = re.compile(r"\^\(([\w.|-]+)\)\$")
_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


def _readable(err: Any) -> str:
    """A validation error as an operator reads it: the allowed values, never the regular expression."""
    if err.get("type") == "string_pattern_mismatch":
        pattern = str((err.get("ctx") or {}).get("pattern", ""))
        choices = _CHOICES.fullmatch(pattern)
        if choices:
            return "must be one of " + ", ".join(choices.group(1).split("|"))
        if pattern == _NAME_PATTERN:
            return "must be 1 to 64 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
        return "is not in the allowed form"
    return str(err.get("msg", "invalid"))


def problem(status: int, code: str, title: str, detail: str, instance: str = "", **extra: str) -> JSONResponse:
    body = {
        "type": f"https://keysteward.dev/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def for_error(request: Request, exc: KeystewardError) -> JSONResponse:
    """The problem answer to one of keysteward's errors."""
    if exc.status >= 500:
        log.warning("%s %s -> %s", request.method, request.url.path, exc.diagnostics())
    if isinstance(exc, Denied):  # a release decision, not a fault: agents read "decision"
        return problem(exc.status, exc.code, exc.title, exc.message, request.url.path, decision="denied")
    response = problem(exc.status, exc.code, exc.title, exc.message, request.url.path)
    if isinstance(exc, RateLimited) and exc.retry_after > 0:
        response.headers["retry-after"] = str(exc.retry_after)
    return response


def for_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """The problem answer to a failure nobody foresaw: its type goes to the log, nothing of it to the client."""
    log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path)
    return problem(500, "internal_error", "Internal error", "the server failed; see its log", request.url.path)


def install(app: FastAPI) -> None:
    @app.exception_handler(KeystewardError)
    async def _keysteward(request: Request, exc: KeystewardError) -> JSONResponse:
        return for_error(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where or 'body'}: {_readable(err)}")
        return problem(422, "invalid_request", "Invalid request", "; ".join(parts), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return problem(exc.status_code, code, str(exc.detail), str(exc.detail), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return for_unexpected(request, exc)
