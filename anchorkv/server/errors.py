"""OpenAI-style error objects. Anything a client sends wrong is a 4xx that names the field, never a 500."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("anchorkv.server")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = status, message, param, type_, headers


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def field_path(loc: Sequence[Any]) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_tag(part):
            out += f".{part}" if out else str(part)
    return out


def invalid(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A validation's errors as what the client sent wrong: (message, the field it names)."""
    first = _telling(errors) if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") in ("model_attributes_type", "dict_type") and len(first.get("loc", ())) <= 1:
        return "the request body must be a JSON object", None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = field_path(first.get("loc", ())) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def _telling(errors: Sequence[Any]) -> Any:
    """The error that says most. A union reports errors for each member: what is wrong inside a member whose
    shape the value has (a list, for a list member: "stop[0]: should be a string", not "stop: should be a
    string"), preferring a complaint about the value to one about its type ("at most 16 items", not "should
    be an integer"), then the member with the fewest errors, then the deepest."""
    members = Counter(_member(e.get("loc", ())) for e in errors)
    unshaped = {_member(e["loc"]) for e in errors if _is_type_error(e) and len(_member(e["loc"])) == len(e["loc"])}

    def telling(e: Any) -> tuple[bool, bool, int, int]:
        loc = e.get("loc", ())
        return _member(loc) not in unshaped, not _is_type_error(e), -members[_member(loc)], len(loc)

    return max(errors, key=telling)


def _is_type_error(e: Any) -> bool:
    return str(e.get("type", "")).endswith("_type")


def _member(loc: Sequence[Any]) -> tuple[Any, ...]:
    """An error's location up to the union member it was checked against (all of it outside unions)."""
    tags = [i for i, part in enumerate(loc) if _is_union_tag(part)]
    return tuple(loc[: tags[-1] + 1] if tags else loc)


def _is_union_tag(part: Any) -> bool:
    # pydantic names union members in locations, e.g. 'str', 'list[int]', 'constrained-str', 'function-after[...]'
    return isinstance(part, str) and (
        "[" in part or "-" in part or part in {"str", "int", "float", "bool", "list", "dict"}
    )


ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
    499: "invalid_request_error", 503: "overloaded_error",
}  # fmt: skip


def shaped(request: Request, status: int, message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    """The error object of the API the request was sent to: Anthropic's on /v1/messages, else OpenAI's."""
    if status < 500:
        log.info("[request] %d %s: %s", status, request.url.path, message)
    if request.url.path.startswith(("/v1/messages", "/messages")):
        return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    return error_body(message, type_, param)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        body = shaped(request, e.status, e.message, e.type, e.param)
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = invalid(e.errors())
        return JSONResponse(shaped(request, 400, message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        body = shaped(request, e.status_code, str(e.detail), type_)
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(
            shaped(request, 500, f"internal error: {type(e).__name__}", "server_error"), status_code=500
        )
