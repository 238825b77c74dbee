"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with a matching status."""

from __future__ import annotations

from starlette.responses import JSONResponse

# engine error kinds -> (HTTP status, OpenAI error type)
ENGINE_KINDS: dict[str, tuple[int, str]] = {
    "bad_input": (400, "invalid_request_error"),
    "context_full": (400, "invalid_request_error"),
    "model_not_found": (404, "invalid_request_error"),
    "bad_model": (400, "invalid_request_error"),
    "unsupported": (400, "invalid_request_error"),
    "out_of_memory": (503, "server_error"),
    "engine_crashed": (503, "server_error"),
    "engine_hung": (503, "server_error"),
    "engine_failed": (503, "server_error"),
    "engine_stopped": (503, "server_error"),
}


class APIError(Exception):
    """An error answered to the client: `status` is the HTTP status, the rest goes in the body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_engine(kind: str, message: str) -> APIError:
    status, type_ = ENGINE_KINDS.get(kind, (500, "server_error"))
    return APIError(status, message, type_, code=kind)


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)
