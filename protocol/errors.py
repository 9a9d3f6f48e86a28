"""Error codes of the stepstream protocol and the exception that carries them.

Codes are short snake_case strings so that they read well in logs and on the
wire; spec/PROTOCOL.md lists each with when it is sent.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # Frame and codec errors: fatal to the connection.
    MALFORMED_FRAME = "malformed_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    UNKNOWN_MESSAGE_TYPE = "unknown_message_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID_FIELD = "invalid_field"
    UNEXPECTED_MESSAGE = "unexpected_message"
    # Connection limits (spec 3.5): the connection ends, nothing was wrong with a frame.
    IDLE_TIMEOUT = "idle_timeout"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    # Job errors: end the job, the connection stays usable.
    UNKNOWN_JOB = "unknown_job"
    UNSUPPORTED_PIPELINE = "unsupported_pipeline"
    UNKNOWN_MODEL = "unknown_model"
    MODEL_UNAVAILABLE = "model_unavailable"
    INVALID_REQUEST = "invalid_request"
    NO_CAPACITY = "no_capacity"
    PRICE_TOO_HIGH = "price_too_high"
    INVALID_PAYMENT = "invalid_payment"
    INVALID_TICKET_PARAMS = "invalid_ticket_params"
    # Ticket validation, in the order the recipient checks (spec 8.4).
    TICKET_WRONG_RECIPIENT = "ticket_wrong_recipient"
    TICKET_ZERO_SENDER = "ticket_zero_sender"
    TICKET_RAND_MISMATCH = "ticket_rand_mismatch"
    TICKET_BAD_SIGNATURE = "ticket_bad_signature"
    TICKET_NONCE_REPLAYED = "ticket_nonce_replayed"
    TICKET_ROUND_INVALID = "ticket_round_invalid"
    TICKET_PARAMS_EXPIRED = "ticket_params_expired"
    SENDER_INSUFFICIENT_FUNDS = "sender_insufficient_funds"
    PAYMENT_TIMEOUT = "payment_timeout"
    PIPELINE_FAILED = "pipeline_failed"
    RUNNER_LOST = "runner_lost"
    CANCELLED = "cancelled"
    INVALID_RESULT = "invalid_result"
    """Broadcaster side: a result that does not match its request (spec J7); fatal."""
    NO_ORCHESTRATOR = "no_orchestrator"
    DEADLINE_UNMEETABLE = "deadline_unmeetable"
    """Broadcaster side: no orchestrator could finish the job (spec 15.4)."""
    INTERNAL_ERROR = "internal_error"


class ProtocolError(Exception):
    """A rule of the protocol was broken; `code` is what goes on the wire."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
