"""Every failure the HTTP API reports, as OpenAI's error JSON with the right status.

In:  `ApiError` raised by moeserve.server code, `MoeServeError` from the engine, loader and policy
     code (a user mistake, one sentence), FastAPI's request validation errors, Starlette's HTTP
     exceptions (unknown route, wrong method), and anything else (a bug).
Out: `{"error": {"message", "type", "param", "code"}}` with a 4xx status for every user error, and
     500 only for a bug in moeserve (logged with its traceback, never shown to the client).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeserve.errors import MoeServeError

logger = logging.getLogger("moeserve.server")

# OpenAI's error types by status; `code` carries a finer reason where there is one.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A request the server refuses: status, one-sentence message, the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    }


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def error_event(exc: BaseException) -> bytes:
    """An error inside a stream whose 200 header is already sent: one SSE event with the error JSON."""
    status, message = (exc.status, exc.message) if isinstance(exc, ApiError) else (500, "internal server error")
    if isinstance(exc, MoeServeError):
        status, message = 400, str(exc)
    return f"data: {json.dumps(error_body(status, message))}\n\n".encode()


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first pydantic error as one sentence, and the parameter it names."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind = first.get("type", "")
    if kind in ("json_invalid", "json_type"):
        return "the request body is not valid JSON; send a JSON object with Content-Type: application/json.", None
    # Union members show up in the location as type tags ("str", "list[int]"); they name no parameter.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    if not loc:
        return "the request body must be a JSON object with the request's parameters.", None
    param = ".".join(loc)
    if kind == "missing":
        return f"{param} is required.", param
    if kind == "too_short":
        return f"{param} is empty; send at least one item.", param
    if any(_is_type_tag(p) for p in first.get("loc", ())):
        return f"{param} has the wrong type; see the OpenAI API reference for its allowed forms.", param
    return f"{param} is invalid: {first.get('msg', 'wrong value')}.", param


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict") or "[" in part)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(MoeServeError)
    async def _user_error(request: Request, exc: MoeServeError):
        return error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"there is no endpoint {request.method} {request.url.path}; see /docs for the API."
        elif exc.status_code == 405:
            message = f"{request.url.path} does not accept {request.method}; see /docs for the API."
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error; the server log has the details.")
