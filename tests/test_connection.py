"""Tests of protocol.connection: two Connection objects talking through bytes."""

from __future__ import annotations

from fractions import Fraction

import msgpack
import pytest

from protocol import codec
from protocol.connection import TRANSITIONS, Connection, State
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    MESSAGE_TYPES,
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
    ResultImage,
    Role,
    SignedTicket,
    Status,
    TextToImageParams,
    TicketParams,
)

B = Role.BROADCASTER
O = Role.ORCHESTRATOR  # noqa: E741 - the spec's name for the role
ADDR = bytes(range(20))
PARAMS = TicketParams(
    recipient=ADDR,
    face_value=10**15,
    win_prob=2**250,
    recipient_rand_hash=b"\x01" * 32,
    seed=b"\x02" * 32,
    expiration_block=1000,
)


def messages(job_id: str = "job-1") -> dict[type[Message], Message]:
    """One valid message of every type, naming `job_id` where it has one."""
    return {
        Hello: Hello(sender=ADDR, agent="b"),
        Info: Info(
            orchestrator=ADDR, capabilities=(), ticket_params=PARAMS, max_frame_bytes=1 << 20
        ),
        JobRequest: JobRequest(
            job_id=job_id, pipeline="text-to-image", model_id="m", params=TextToImageParams("cat")
        ),
        JobAccepted: JobAccepted(
            job_id=job_id,
            steps=4,
            pixels_per_step=64,
            price_per_pixel_step=Fraction(1, 2),
            fee=Fraction(128),
            window_steps=2,
            seed=9,
            ticket_params=PARAMS,
        ),
        Payment: Payment(
            job_id=job_id,
            sender=ADDR,
            ticket_params=PARAMS,
            tickets=(SignedTicket(sender_nonce=1, sig=b"\x03" * 65),),
        ),
        Credit: Credit(
            job_id=job_id, credit=Fraction(64), covered_steps=2, tickets_accepted=1, winners=0
        ),
        Progress: Progress(job_id=job_id, step=1, total_steps=4, covered_steps=2),
        AwaitingPayment: AwaitingPayment(
            job_id=job_id, next_step=3, covered_steps=2, timeout_ms=5000
        ),
        Preview: Preview(job_id=job_id, step=1, image=b"img", format="webp", width=8, height=8),
        Result: Result(
            job_id=job_id,
            images=(ResultImage(image=b"png", format="png", width=8, height=8, seed=9),),
            steps=4,
            pixel_steps=256,
            fee=Fraction(128),
        ),
        Cancel: Cancel(job_id=job_id),
        Cancelled: Cancelled(job_id=job_id, steps=0),
        Error: Error(code="no_capacity", message="busy", job_id=job_id),
        ResultFrame: ResultFrame(
            job_id=job_id,
            index=0,
            frame=ResultImage(image=b"png", format="png", width=8, height=8, seed=9),
        ),
        Status: Status(job_id=job_id, phase="decoding", next_within_ms=2000),
        InfoRequest: InfoRequest(),
        Queued: Queued(job_id=job_id, position=1, estimated_start_ms=0, next_within_ms=4000),
    }


MSG = messages()

CAN_SEND: dict[tuple[State, Role], set[type[Message]]] = {
    (State.AWAIT_HELLO, B): {Hello, Error},
    (State.AWAIT_HELLO, O): {Error},
    (State.AWAIT_INFO, B): {Error},
    (State.AWAIT_INFO, O): {Info, Error},
    (State.READY, B): {JobRequest, Payment, Cancel, Error},
    (State.READY, O): {Error},
    (State.JOB_REQUESTED, B): {Cancel, Error},
    (State.JOB_REQUESTED, O): {JobAccepted, Cancelled, Error},
    (State.JOB_RUNNING, B): {Payment, Cancel, Error},
    (State.JOB_RUNNING, O): {Credit, Progress, AwaitingPayment, Preview, Result, Cancelled, Error},
    (State.CLOSED, B): set(),
    (State.CLOSED, O): set(),
}


class Pair:
    """A broadcaster and an orchestrator Connection joined by a lossless in-order pipe."""

    def __init__(self) -> None:
        self.b = Connection(B)
        self.o = Connection(O)

    def side(self, role: Role) -> tuple[Connection, Connection]:
        return (self.b, self.o) if role is B else (self.o, self.b)

    def deliver(self, message: Message, role: Role | None = None) -> Message:
        """Send from `role` (default: the type's one sender, or B for Error), receive on the
        other side, and check both sides agree on the state."""
        if role is None:
            role = B if B in message.SENDER else O
        sender, receiver = self.side(role)
        received = receiver.receive(sender.send(message))
        assert received == message
        assert sender.state is receiver.state
        return received

    def check(self, state: State) -> None:
        assert self.b.state is state
        assert self.o.state is state
        assert self.b.can_send() == CAN_SEND[(state, B)]
        assert self.o.can_send() == CAN_SEND[(state, O)]


def pair_in(state: State, job_id: str = "job-1") -> Pair:
    """A pair driven by real messages into `state` (CLOSED through a fatal Error)."""
    pair = Pair()
    msg = messages(job_id)
    steps: dict[State, list[Message]] = {
        State.AWAIT_HELLO: [],
        State.AWAIT_INFO: [msg[Hello]],
        State.READY: [msg[Hello], msg[Info]],
        State.JOB_REQUESTED: [msg[Hello], msg[Info], msg[JobRequest]],
        State.JOB_RUNNING: [msg[Hello], msg[Info], msg[JobRequest], msg[JobAccepted]],
        State.CLOSED: [msg[Hello], Error(code="internal_error", message="bye")],
    }
    for message in steps[state]:
        pair.deliver(message)
    pair.check(state)
    return pair


def _expect(conn: Connection, frame: bytes, code: ErrorCode) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        conn.receive(frame)
    assert info.value.code is code
    assert conn.state is State.CLOSED
    return info.value


# --------------------------------------------------------------------- happy path


def test_full_conversation_two_jobs() -> None:
    pair = Pair()
    pair.check(State.AWAIT_HELLO)
    pair.deliver(MSG[Hello])
    pair.check(State.AWAIT_INFO)
    pair.deliver(MSG[Info])
    pair.check(State.READY)
    assert pair.b.job_id is None and pair.o.job_id is None

    for job_id in ("job-1", "job-2"):
        msg = messages(job_id)
        pair.deliver(msg[JobRequest])
        pair.check(State.JOB_REQUESTED)
        assert pair.b.job_id == pair.o.job_id == job_id
        pair.deliver(msg[JobAccepted])
        pair.check(State.JOB_RUNNING)
        pair.deliver(msg[Payment])
        pair.check(State.JOB_RUNNING)
        pair.deliver(msg[Credit])
        pair.check(State.JOB_RUNNING)
        for step in range(1, 5):
            pair.deliver(Progress(job_id=job_id, step=step, total_steps=4, covered_steps=4))
            pair.check(State.JOB_RUNNING)
            pair.deliver(
                Preview(job_id=job_id, step=step, image=b"p", format="webp", width=8, height=8)
            )
            pair.check(State.JOB_RUNNING)
            if step == 2:
                pair.deliver(msg[AwaitingPayment])
                pair.deliver(msg[Payment])
                pair.deliver(msg[Credit])
                pair.check(State.JOB_RUNNING)
        pair.deliver(msg[Result])
        pair.check(State.READY)
        assert pair.b.job_id == pair.o.job_id == job_id  # the job that ended last


def test_cancel_paths() -> None:
    pair = pair_in(State.JOB_REQUESTED)
    pair.deliver(MSG[Cancel])
    pair.check(State.JOB_REQUESTED)
    pair.deliver(MSG[Cancelled])
    pair.check(State.READY)

    pair = pair_in(State.JOB_REQUESTED)
    pair.deliver(MSG[Cancel])
    pair.deliver(MSG[JobAccepted])  # the accept crossed the cancel on the wire
    pair.check(State.JOB_RUNNING)
    pair.deliver(MSG[Cancel])
    pair.check(State.JOB_RUNNING)
    pair.deliver(MSG[Cancelled])
    pair.check(State.READY)
    pair.deliver(MSG[Cancel])  # a second, late cancel
    pair.check(State.READY)


def test_orchestrator_may_refuse_with_cancelled_before_accepting() -> None:
    pair = pair_in(State.JOB_REQUESTED)
    pair.deliver(MSG[Cancelled])
    pair.check(State.READY)


# --------------------------------------------------------------------- wrong state


def _wrong_state_cases() -> list[tuple[State, type[Message]]]:
    cases = []
    for state in State:
        if state is State.CLOSED:
            continue
        for cls in MESSAGE_TYPES.values():
            if cls is Error:
                continue
            if (state, cls) not in TRANSITIONS:
                cases.append((state, cls))
    return cases


@pytest.mark.parametrize(
    ("state", "cls"), _wrong_state_cases(), ids=lambda x: getattr(x, "TYPE", str(x))
)
def test_wrong_state_message(state: State, cls: type[Message]) -> None:
    pair = pair_in(state)
    sender_role = B if B in cls.SENDER else O
    sender, receiver = pair.side(sender_role)
    frame = codec.encode(MSG[cls])
    # The sender refuses it and stays where it was...
    with pytest.raises(ProtocolError) as info:
        sender.send(MSG[cls])
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert sender.state is state
    assert cls not in sender.can_send()
    # ...and the receiver, given the bytes anyway, fails and closes.
    err = _expect(receiver, frame, ErrorCode.UNEXPECTED_MESSAGE)
    assert cls.TYPE in err.message and state.value in err.message


@pytest.mark.parametrize("state", [State.AWAIT_HELLO, State.AWAIT_INFO, State.READY])
@pytest.mark.parametrize("role", [B, O])
def test_job_error_outside_a_job(state: State, role: Role) -> None:
    pair = pair_in(state)
    sender, receiver = pair.side(role)
    error = MSG[Error]
    with pytest.raises(ProtocolError) as info:
        sender.send(error)
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert sender.state is state
    _expect(receiver, codec.encode(error), ErrorCode.UNEXPECTED_MESSAGE)


def test_hello_twice_and_info_before_hello() -> None:
    pair = pair_in(State.AWAIT_HELLO)
    _expect(pair.b, codec.encode(MSG[Info]), ErrorCode.UNEXPECTED_MESSAGE)
    pair = pair_in(State.READY)
    _expect(pair.o, codec.encode(MSG[Hello]), ErrorCode.UNEXPECTED_MESSAGE)


# --------------------------------------------------------------------- wrong role


@pytest.mark.parametrize(
    "cls", [c for c in MESSAGE_TYPES.values() if c is not Error], ids=lambda c: c.TYPE
)
def test_wrong_role(cls: type[Message]) -> None:
    """Each type but Error has one sender; the other role may neither send nor receive it."""
    wrong = O if B in cls.SENDER else B
    # Put both sides where the type is allowed for its real sender.
    state = next(s for (s, t) in TRANSITIONS if t is cls)
    pair = pair_in(state)
    sender, receiver = pair.side(wrong)
    with pytest.raises(ProtocolError) as info:
        sender.send(MSG[cls])
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert "never sent" in info.value.message
    assert sender.state is state
    err = _expect(receiver, codec.encode(MSG[cls]), ErrorCode.UNEXPECTED_MESSAGE)
    assert f"never sent by the {wrong.value}" in err.message


# --------------------------------------------------------------------- job ids


@pytest.mark.parametrize(
    ("state", "cls"),
    [
        (State.JOB_REQUESTED, JobAccepted),
        (State.JOB_REQUESTED, Cancelled),
        (State.JOB_REQUESTED, Cancel),
        (State.JOB_REQUESTED, Error),
        (State.JOB_RUNNING, Payment),
        (State.JOB_RUNNING, Credit),
        (State.JOB_RUNNING, Progress),
        (State.JOB_RUNNING, AwaitingPayment),
        (State.JOB_RUNNING, Preview),
        (State.JOB_RUNNING, Result),
        (State.JOB_RUNNING, Cancel),
        (State.JOB_RUNNING, Cancelled),
        (State.JOB_RUNNING, Error),
    ],
    ids=str,
)
def test_job_id_mismatch(state: State, cls: type[Message]) -> None:
    pair = pair_in(state)
    other = messages("job-other")[cls]
    role = O if O in cls.SENDER else B
    sender, receiver = pair.side(role)
    with pytest.raises(ProtocolError) as info:
        sender.send(other)
    assert info.value.code is ErrorCode.UNKNOWN_JOB
    assert sender.state is state
    err = _expect(receiver, codec.encode(other), ErrorCode.UNKNOWN_JOB)
    assert "job-other" in err.message and "job-1" in err.message


def test_late_payment_for_another_job_is_unknown() -> None:
    pair = pair_in(State.JOB_RUNNING)
    pair.deliver(MSG[Result])
    _expect(pair.o, codec.encode(messages("job-0")[Payment]), ErrorCode.UNKNOWN_JOB)


def test_payment_before_any_job_is_unknown_job() -> None:
    pair = pair_in(State.READY)
    _expect(pair.o, codec.encode(MSG[Payment]), ErrorCode.UNKNOWN_JOB)


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize("state", [State.JOB_REQUESTED, State.JOB_RUNNING])
def test_job_error_returns_to_ready(state: State) -> None:
    """The orchestrator ends a job with an error carrying its job_id (spec 5, S4)."""
    pair = pair_in(state)
    pair.deliver(MSG[Error], O)
    pair.check(State.READY)
    # A late payment for that job is still accepted, and a new job can follow.
    pair.deliver(MSG[Payment])
    pair.deliver(MSG[Cancel])
    pair.check(State.READY)
    msg = messages("job-2")
    pair.deliver(msg[JobRequest])
    pair.deliver(msg[JobAccepted])
    pair.deliver(msg[Result])
    pair.check(State.READY)


@pytest.mark.parametrize("state", [s for s in State if s is not State.CLOSED])
@pytest.mark.parametrize("role", [B, O])
def test_fatal_error_closes(state: State, role: Role) -> None:
    pair = pair_in(state)
    sender, receiver = pair.side(role)
    fatal = Error(code="internal_error", message="going away")
    assert Error in sender.can_send()
    received = receiver.receive(sender.send(fatal))
    assert received == fatal
    pair.check(State.CLOSED)


def test_late_payment_and_cancel_after_result() -> None:
    pair = pair_in(State.JOB_RUNNING)
    pair.deliver(MSG[Result])
    pair.check(State.READY)
    for _ in range(2):
        pair.deliver(MSG[Payment])
        pair.check(State.READY)
    pair.deliver(MSG[Cancel])
    pair.check(State.READY)
    # The orchestrator may not answer the late cancel with Cancelled.
    with pytest.raises(ProtocolError) as info:
        pair.o.send(MSG[Cancelled])
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


@pytest.mark.parametrize("cls", list(MESSAGE_TYPES.values()), ids=lambda c: c.TYPE)
def test_nothing_accepted_after_closed(cls: type[Message]) -> None:
    for message in (MSG[cls], Error(code="c", message="m")):
        pair = pair_in(State.CLOSED)
        for role in (B, O):
            conn = pair.side(role)[0]
            if role in message.SENDER:
                with pytest.raises(ProtocolError) as info:
                    conn.send(message)
                assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
            err = _expect(conn, codec.encode(message), ErrorCode.UNEXPECTED_MESSAGE)
            assert "closed" in err.message or "never sent" in err.message
        pair.check(State.CLOSED)


def test_decode_error_closes_and_error_frame_is_decodable() -> None:
    pair = pair_in(State.JOB_RUNNING)
    frame = msgpack.packb({"v": 1, "type": "progress", "job_id": "job-1", "step": -1})
    err = _expect(pair.b, frame, ErrorCode.INVALID_FIELD)
    assert pair.b.can_send() == frozenset()
    reply = pair.b.error_frame(err)
    assert pair.b.state is State.CLOSED
    decoded = codec.decode(reply)
    assert decoded == Error(code="invalid_field", message=err.message, job_id=None)
    # The peer takes it as a fatal error and closes too.
    assert pair.o.receive(reply) == decoded
    assert pair.o.state is State.CLOSED


def test_error_frame_from_open_state() -> None:
    pair = pair_in(State.READY)
    reply = pair.o.error_frame(ProtocolError(ErrorCode.NO_CAPACITY, "full"))
    assert pair.o.state is State.CLOSED
    assert codec.decode(reply) == Error(code="no_capacity", message="full")
    assert pair.b.receive(reply) == Error(code="no_capacity", message="full")
    assert pair.b.state is State.CLOSED


def test_frame_over_connection_limit() -> None:
    conn = Connection(O, max_frame_bytes=16)
    frame = codec.encode(MSG[Hello])
    assert len(frame) > 16
    _expect(conn, frame, ErrorCode.FRAME_TOO_LARGE)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\xc1", ErrorCode.MALFORMED_FRAME),
        (msgpack.packb({"v": 2, "type": "hello"}), ErrorCode.UNSUPPORTED_VERSION),
        (msgpack.packb({"v": 1, "type": "bye"}), ErrorCode.UNKNOWN_MESSAGE_TYPE),
    ],
)
def test_codec_errors_close(frame: bytes, code: ErrorCode) -> None:
    pair = pair_in(State.READY)
    _expect(pair.o, frame, code)
    assert pair.b.state is State.READY


# ---- regressions for faults found in review


def test_error_frame_with_a_long_message_still_decodes() -> None:
    o = Connection(Role.ORCHESTRATOR)
    b = Connection(Role.BROADCASTER)
    frame = msgpack.packb({"v": 1, "type": "x" * 2000})
    with pytest.raises(ProtocolError) as err:
        o.receive(frame)
    reply = b.receive(o.error_frame(err.value))
    assert isinstance(reply, Error) and len(reply.message) <= 1024


def test_send_refuses_an_invalid_message_and_keeps_its_state() -> None:
    b = Connection(Role.BROADCASTER)
    with pytest.raises(ProtocolError) as err:
        b.send(Hello(sender=b"short"))
    assert err.value.code == ErrorCode.INVALID_FIELD
    assert b.state == State.AWAIT_HELLO
    b.send(Hello(sender=bytes(20)))
    assert b.state == State.AWAIT_INFO


def test_broadcaster_cannot_end_a_job_with_an_error() -> None:
    pair = pair_in(State.JOB_REQUESTED)
    frame = codec.encode(Error(code="internal_error", message="m", job_id="job-1"))
    _expect(pair.o, frame, ErrorCode.UNEXPECTED_MESSAGE)


def test_a_new_job_may_not_reuse_the_previous_job_id() -> None:
    pair = pair_in(State.JOB_REQUESTED)
    pair.deliver(Error(code="no_capacity", message="busy", job_id="job-1"), O)
    _expect(pair.o, codec.encode(MSG[JobRequest]), ErrorCode.INVALID_FIELD)


def test_optional_messages_need_their_feature() -> None:
    """Spec 12.1: `result_frame` and `status` only to a broadcaster that listed them."""
    for features, allowed in (((), False), (("result_frames", "status"), True)):
        pair = Pair()
        pair.deliver(Hello(sender=ADDR, features=features))
        pair.deliver(MSG[Info])
        pair.deliver(MSG[JobRequest])
        if allowed:
            pair.deliver(MSG[Status])  # loading, before the quote
        else:
            with pytest.raises(ProtocolError, match="needs the feature"):
                pair.o.send(MSG[Status])
        pair.deliver(MSG[JobAccepted])
        if allowed:
            pair.deliver(MSG[ResultFrame])
            assert {ResultFrame, Status} <= pair.o.can_send()
        else:
            assert not {ResultFrame, Status} & pair.o.can_send()
            frame = codec.encode(MSG[ResultFrame])
            with pytest.raises(ProtocolError, match="needs the feature"):
                pair.b.receive(frame)


def test_info_request_between_jobs_needs_its_feature() -> None:
    """Spec 4.5: `info_request` in `ready`, from a B whose hello listed it, answered by
    `info`; no job may be sent before that info arrives."""
    pair = Pair()
    pair.deliver(MSG[Hello])
    pair.deliver(MSG[Info])
    with pytest.raises(ProtocolError, match="needs the feature"):
        pair.b.send(InfoRequest())
    _expect(pair.o, codec.encode(InfoRequest()), ErrorCode.UNEXPECTED_MESSAGE)

    pair = Pair()
    pair.deliver(Hello(sender=ADDR, features=("info_request",)))
    pair.deliver(MSG[Info])
    assert InfoRequest in pair.b.can_send()
    for job_id in ("job-1", "job-2"):
        pair.deliver(InfoRequest())
        assert pair.b.state is pair.o.state is State.AWAIT_INFO
        assert pair.b.can_send() == {Error}
        pair.deliver(MSG[Info])
        msg = messages(job_id)
        pair.deliver(msg[JobRequest])
        pair.deliver(msg[JobAccepted])
        with pytest.raises(ProtocolError, match="not allowed in state job_running"):
            pair.b.send(InfoRequest())
        pair.deliver(msg[Cancel])
        pair.deliver(msg[Cancelled])
    pair.deliver(InfoRequest())
    _expect(pair.o, codec.encode(MSG[JobRequest]), ErrorCode.UNEXPECTED_MESSAGE)


def test_a_job_waits_in_the_queue_before_its_quote_only_for_who_asked() -> None:
    """Spec 4.6: `queued` in job_requested, to a B that listed `queue`; then the quote, or
    `cancelled` when B cancels while it waits; never while the job runs."""
    pair = Pair()
    pair.deliver(Hello(sender=ADDR, features=("queue",)))
    pair.deliver(MSG[Info])
    pair.deliver(MSG[JobRequest])
    pair.deliver(MSG[Queued])
    pair.deliver(MSG[Queued])
    pair.deliver(MSG[Cancel])
    pair.deliver(MSG[Cancelled])
    msg = messages("job-2")
    pair.deliver(msg[JobRequest])
    pair.deliver(msg[Queued])
    pair.deliver(msg[JobAccepted])
    with pytest.raises(ProtocolError, match="not allowed in state job_running"):
        pair.o.send(msg[Queued])
    pair = pair_in(State.JOB_REQUESTED)  # a hello without features
    with pytest.raises(ProtocolError, match="needs the feature"):
        pair.o.send(MSG[Queued])
