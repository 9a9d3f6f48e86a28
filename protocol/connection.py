"""The connection state machine, one object per side of a WebSocket.

Both sides track the same conversation state (as h11 does for HTTP): a
message is accepted only in a state where spec/PROTOCOL.md section 5 allows
it from that sender, and every accepted message moves the state along the
table below. ``receive`` turns bytes into a message or a ProtocolError;
``send`` turns a message into bytes, refusing one this side may not send now.
"""

from __future__ import annotations

from enum import StrEnum

from protocol import codec
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    FEATURE_INFO_REQUEST,
    FEATURE_QUEUE,
    FEATURE_RESULT_FRAMES,
    FEATURE_STATUS,
    AwaitingPayment,
    Cancel,
    Cancelled,
    Credit,
    Error,
    Hello,
    Info,
    InfoRequest,
    JobAccepted,
    JobRequest,
    Message,
    Payment,
    Preview,
    Progress,
    Queued,
    Result,
    ResultFrame,
    Role,
    Status,
    error_message,
)


class State(StrEnum):
    AWAIT_HELLO = "await_hello"
    AWAIT_INFO = "await_info"
    READY = "ready"
    JOB_REQUESTED = "job_requested"
    JOB_RUNNING = "job_running"
    CLOSED = "closed"


S = State
_JOB_UPDATES = (Credit, Progress, AwaitingPayment, Preview)
_JOB_ENDS = (Result, Cancelled)

# (state, message type) -> next state. The sender of each type is fixed by
# its SENDER; job-level errors (with a job_id) are handled in _next_state.
TRANSITIONS: dict[tuple[State, type[Message]], State] = {
    (S.AWAIT_HELLO, Hello): S.AWAIT_INFO,
    (S.AWAIT_INFO, Info): S.READY,
    (S.READY, JobRequest): S.JOB_REQUESTED,
    (S.JOB_REQUESTED, JobAccepted): S.JOB_RUNNING,
    (S.JOB_REQUESTED, Cancel): S.JOB_REQUESTED,
    (S.JOB_REQUESTED, Cancelled): S.READY,
    (S.JOB_RUNNING, Payment): S.JOB_RUNNING,
    (S.JOB_RUNNING, Cancel): S.JOB_RUNNING,
    **{(S.JOB_RUNNING, t): S.JOB_RUNNING for t in _JOB_UPDATES},
    **{(S.JOB_RUNNING, t): S.READY for t in _JOB_ENDS},
    # A payment or cancel that crossed the job's end on the wire is not an
    # error: the job it names is the one that just ended (spec 5.3).
    (S.READY, Payment): S.READY,
    (S.READY, Cancel): S.READY,
    # Optional messages (spec 12.1), only to a broadcaster that listed their feature.
    (S.JOB_RUNNING, ResultFrame): S.JOB_RUNNING,
    (S.JOB_REQUESTED, Status): S.JOB_REQUESTED,
    (S.JOB_RUNNING, Status): S.JOB_RUNNING,
    # A fresh info on an open connection, between jobs (spec 4.5).
    (S.READY, InfoRequest): S.AWAIT_INFO,
    # Waiting for a slot, before the quote (spec 4.6).
    (S.JOB_REQUESTED, Queued): S.JOB_REQUESTED,
}

FEATURE_OF: dict[type[Message], str] = {
    ResultFrame: FEATURE_RESULT_FRAMES,
    Status: FEATURE_STATUS,
    InfoRequest: FEATURE_INFO_REQUEST,
    Queued: FEATURE_QUEUE,
}
"""The feature a broadcaster must list in `hello` before this may be sent: the orchestrator's
optional messages, and `info_request`, which B sends only to an O whose `info.features`
lists it."""


class Connection:
    """Protocol state for one side (`role`) of one connection."""

    def __init__(self, role: Role, max_frame_bytes: int = codec.DEFAULT_MAX_FRAME_BYTES) -> None:
        self.role = role
        self.peer = Role.ORCHESTRATOR if role is Role.BROADCASTER else Role.BROADCASTER
        self.max_frame_bytes = max_frame_bytes
        self.state = State.AWAIT_HELLO
        self.job_id: str | None = None
        """The job in progress, or the job that ended last while READY."""
        self.features: frozenset[str] = frozenset()
        """What the broadcaster's hello listed, of the features this side knows."""

    # ------------------------------------------------------------ public API

    def receive(self, frame: bytes) -> Message:
        """Decode a frame from the peer and advance the state.

        Raises ProtocolError; any such error is fatal, and the state is then
        CLOSED (send the error with `error_frame` and close the socket).
        """
        try:
            message = codec.decode(frame, self.max_frame_bytes)
            self._advance(message, self.peer)
        except ProtocolError:
            self.state = State.CLOSED
            raise
        return message

    def send(self, message: Message) -> bytes:
        """Encode a message of ours and advance the state.

        Refuses (ProtocolError, state unchanged) a message not allowed now or
        one the peer would refuse: we never put an invalid frame on the wire.
        """
        frame = codec.encode(message)
        codec.decode(frame, self.max_frame_bytes)
        self._advance(message, self.role)
        return frame

    def error_frame(self, error: ProtocolError) -> bytes:
        """The frame that reports a fatal error to the peer; closes the connection."""
        self.state = State.CLOSED
        return codec.encode(error_message(error.code.value, error.message))

    def can_send(self) -> frozenset[type[Message]]:
        """The message types this side may send in the current state."""
        allowed = {t for (state, t) in TRANSITIONS if state is self.state}
        allowed = {t for t in allowed if self.role in t.SENDER}
        allowed = {t for t in allowed if FEATURE_OF.get(t, "") in self.features | {""}}
        if self.state is not State.CLOSED:
            allowed.add(Error)
        return frozenset(allowed)

    # ------------------------------------------------------------ internals

    def _advance(self, message: Message, sender: Role) -> None:
        if sender not in message.SENDER:
            raise ProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"'{message.TYPE}' is never sent by the {sender.value}",
            )
        state = self._next_state(message, sender)
        feature = FEATURE_OF.get(type(message))
        if feature is not None and feature not in self.features:
            raise ProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"'{message.TYPE}' needs the feature {feature!r}, which hello did not list",
            )
        if isinstance(message, Hello):
            self.features = frozenset(message.features)
        self.state = state

    def _next_state(self, message: Message, sender: Role) -> State:
        state = self.state
        if state is State.CLOSED:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "the connection is closed")
        if isinstance(message, Error):
            if message.job_id is None:
                return State.CLOSED
            # Only the orchestrator ends a job with an error (spec 5).
            if sender is Role.ORCHESTRATOR and state in (State.JOB_REQUESTED, State.JOB_RUNNING):
                self._check_job(message.job_id)
                return State.READY
            raise self._unexpected(message)
        target = TRANSITIONS.get((state, type(message)))
        if target is None:
            raise self._unexpected(message)
        if isinstance(message, JobRequest):
            if message.job_id == self.job_id:
                raise ProtocolError(
                    ErrorCode.INVALID_FIELD,
                    f"job.job_id: {message.job_id!r} was the previous job's id on this connection",
                )
            self.job_id = message.job_id
        else:
            self._check_job(getattr(message, "job_id", self.job_id))
        return target

    def _check_job(self, job_id: str | None) -> None:
        if job_id != self.job_id:
            raise ProtocolError(
                ErrorCode.UNKNOWN_JOB,
                f"job {job_id!r} is not this connection's job {self.job_id!r}",
            )

    def _unexpected(self, message: Message) -> ProtocolError:
        return ProtocolError(
            ErrorCode.UNEXPECTED_MESSAGE,
            f"'{message.TYPE}' is not allowed in state {self.state.value}",
        )
