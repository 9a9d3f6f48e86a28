"""One error shape for every failure the gateway reports over HTTP.

go-livepeer's gateway answers errors as `{"error": {"message": ...}}`
(server/handlers.go, APIErrorResponse); we add a machine-readable `code`
beside the message, which Livepeer clients ignore. ai-runner answers
`{"detail": {"msg": ...}}`, and the Livepeer AI SDK (livepeer-ai) parses
only that shape: every error carries both, with the same message.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from protocol.errors import ErrorCode

# Protocol error codes from an orchestrator, mapped to the HTTP status we answer with.
_STATUS_FOR_CODE = {
    ErrorCode.INVALID_REQUEST.value: 400,
    ErrorCode.CANCELLED.value: 499,
    ErrorCode.PRICE_TOO_HIGH.value: 503,
    ErrorCode.NO_CAPACITY.value: 503,
    ErrorCode.UNKNOWN_MODEL.value: 503,
    ErrorCode.UNSUPPORTED_PIPELINE.value: 503,
    ErrorCode.MODEL_UNAVAILABLE.value: 503,
    ErrorCode.NO_ORCHESTRATOR.value: 503,
}


class ApiError(Exception):
    """An error to answer with: HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, dict[str, str]]:
        return {
            "error": {"message": self.message, "code": self.code},
            "detail": {"msg": self.message},
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def from_job_error(code: str, message: str) -> ApiError:
    """A job's protocol error, as the HTTP error the sync route answers with."""
    return ApiError(_STATUS_FOR_CODE.get(code, 500), code, message)
