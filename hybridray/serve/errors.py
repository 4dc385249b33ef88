"""OpenAI-style errors: what request handlers raise, and the body clients get.

Every refusal has the same shape, ``{"error": {"message", "type", "param", "code"}}``, so
clients (the official one included) show the message instead of a parse failure.
"""

from typing import Any

from fastapi.responses import JSONResponse


class HTTPError(Exception):
    """Raised in a handler, answered as an OpenAI-style error."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = \
            status, message, type_, code, param
        self.headers = headers or {}


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """An OpenAI-style error; ``extra`` keys go beside ``error`` (e.g. ``detail``)."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


def unavailable(why: str, retry_after_s: float) -> HTTPError:
    """503 with ``Retry-After``: nothing can take the request now, later something may."""
    return HTTPError(503, f"{why}; retry later", type_="server_error", code="unavailable",
                     headers={"Retry-After": str(max(1, round(retry_after_s)))})


def timeout(limit_s: float) -> HTTPError:
    return HTTPError(504, f"no answer within limits.request_timeout_s={limit_s}s",
                     type_="server_error", code="timeout")


def from_replica(error: dict[str, Any], status: int) -> JSONResponse:
    """The response for an ``{"error": ...}`` a replica returned for bad input."""
    return error_response(status, error["message"], error.get("type", "invalid_request_error"),
                          error.get("code"), error.get("param"))
