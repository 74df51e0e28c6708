"""Errors the server returns: OpenAI JSON bodies, `{"error": {"message", "type", "code", "param"}}`.

`APIError` is raised anywhere a request is refused; `install_error_handlers` makes every other failure
(unknown route, wrong method, an unexpected exception) answer in the same shape.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error returned to the client as OpenAI JSON."""

    def __init__(self, status: int, message: str, type_: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}
        return JSONResponse(body, status_code=self.status)


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> APIError:
    """HTTP 400: the request is malformed or asks for something this server does not do."""
    return APIError(400, message, "invalid_request_error", code, param)


def too_large(limit: int) -> APIError:
    """HTTP 413: the body is over the server's size limit."""
    return APIError(413, f"request body over {limit} bytes", "invalid_request_error", "request_too_large")


def client_gone() -> APIError:
    """HTTP 400 for a client that disconnected before its body was read (an answer nobody receives)."""
    return APIError(
        400,
        "the client disconnected before its request body was read",
        "invalid_request_error",
        "client_disconnected",
    )


def not_found(message: str, param: str) -> APIError:
    """HTTP 404: the named model or adapter is not loaded."""
    return APIError(404, message, "not_found_error", "model_not_found", param)


async def _api_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, APIError)
    return err.response()


async def _http_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, StarletteHTTPException)
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return APIError(err.status_code, str(err.detail), kind, f"http_{err.status_code}").response()


async def _validation_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestValidationError)
    return bad_request(str(err.errors()[0].get("msg", err)), "invalid_value").response()


async def _server_error(request: Request, err: Exception) -> JSONResponse:
    message = f"internal error: {type(err).__name__}: {err}"
    return APIError(500, message, "server_error", "internal_error").response()


def install_error_handlers(app: FastAPI) -> None:
    """Answer every refusal and failure of `app` as OpenAI JSON with a fitting status."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _server_error)
