"""Every failure the HTTP API reports, as OpenAI's error JSON with the right status.

In:  `ApiError` raised by moeserve.server code, `MoeServeError` from the engine, loader and policy
     code (a user mistake, one sentence), FastAPI's request validation errors, Starlette's HTTP
     exceptions (unknown route, wrong method), and anything else (a bug).
Out: `{"error": {"message", "type", "param", "code"}}` with a 4xx status for every user error, and
     500 only for a bug in moeserve (logged once with its traceback, never shown to the client).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


# What a strict pydantic type error expects, per error type and per union member tag.
_EXPECTED = {
    "int_type": "an integer",
    "bool_type": "true or false",
    "float_type": "a number",
    "finite_number": "a finite number (NaN and Infinity are not allowed)",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a JSON object",
    "model_type": "a JSON object",
    "model_attributes_type": "a JSON object",
}
_MEMBERS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list[str]": "a list of strings",
    "list[int]": "a list of token ids",
    "list[list[int]]": "a list of token-id lists",
    "list[TextPart]": "a list of text parts",
    "dict[str,any]": "a JSON object",
    "dict[str,float]": "a JSON object of numbers",
}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first pydantic error as one sentence, and the parameter it names."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind = first.get("type", "")
    if kind in ("json_invalid", "json_type"):
        return "the request body is not valid JSON; send a JSON object with Content-Type: application/json.", None
    loc = [p for p in first.get("loc", ()) if p != "body"]
    # Union members show up in the location as type tags ("str", "list[int]"); the parameter is
    # what comes before the first of them.
    tag_at = next((i for i, p in enumerate(loc) if _is_type_tag(p)), None)
    path = loc if tag_at is None else loc[:tag_at]
    if not path:
        return "the request body must be a JSON object with the request's parameters.", None
    param = ".".join(str(p) for p in path)
    got = _shown(first.get("input"))
    if kind == "missing":
        return f"{param} is required.", param
    if kind == "too_short":
        return f"{param} is empty; send at least one item.", param
    if tag_at is not None:
        members = []
        for error in errors:
            rest = [p for p in error.get("loc", ()) if p != "body"]
            if rest[:tag_at] == path and len(rest) > tag_at and _is_type_tag(rest[tag_at]):
                member = _MEMBERS.get(str(rest[tag_at]).replace(" ", ""), str(rest[tag_at]))
                if member not in members:
                    members.append(member)
        alternatives = " or ".join(members) if len(members) < 3 else ", ".join(members[:-1]) + " or " + members[-1]
        return f"{param} must be {alternatives}, got {_shown(_input_at(exc, path))}.", param
    if kind in _EXPECTED:
        return f"{param} must be {_EXPECTED[kind]}, got {got}.", param
    return f"{param} is invalid: {first.get('msg', 'wrong value')}.", param


def _input_at(exc: RequestValidationError, path: list) -> object:
    """The value the client sent at `path` of the body (for a union error, the whole parameter)."""
    value = getattr(exc, "body", None)
    for part in path:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _shown(value: object, limit: int = 40) -> str:
    """A client value quoted in an error message: JSON, cut short (a prompt may be megabytes)."""
    try:
        text = json.dumps(value, allow_nan=True)
    except RecursionError:  # a value nested as deep as the JSON parser allows
        return "a deeply nested value"
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
            message = _unparsable_body(exc) or str(exc.detail)
        code = "request_too_large" if exc.status_code == 413 else None  # a chunked body stopped mid-read
        return error_response(exc.status_code, message, code=code)


def _unparsable_body(exc: StarletteHTTPException) -> str | None:
    """Our sentence for a body FastAPI could not parse as JSON for a reason other than its syntax: it
    answers those with a generic 400 raised from the cause (json.JSONDecodeError has its own path)."""
    cause = exc.__cause__
    if exc.status_code != 400:
        return None
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 (at byte {cause.start}); send the JSON encoded as UTF-8."
    if isinstance(cause, RecursionError):
        return "the request body nests arrays or objects too deeply to parse; send a flatter JSON body."
    return None


class InternalErrorMiddleware:
    """A bug (any exception no handler took) → its traceback logged once, and a 500 with the error JSON.

    Starlette's outermost middleware would answer too, but it then re-raises the exception so that the
    server logs it as well: every traceback appeared twice in the log. Added first, this middleware sits
    inside that one and ends the exception here."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("internal error on %s %s", scope["method"], scope["path"])
            if not started:  # else the client already has a status line: the connection just ends
                await error_response(500, "internal server error; the server log has the details.")(scope, receive, send)
