"""Keys, the durable winner queue, the redeemer's retries, the face value floor."""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

import anyio
import pytest

from orchestrator.config import ModelEntry
from orchestrator.redeemer import Redeemer
from orchestrator.server import Orchestrator, OrchestratorConfig
from orchestrator.winners import FAILED, PENDING, REDEEMED, WinnerQueue
from protocol.pm import MAX_UINT256, Ticket, address_of, recipient_rand_hash, sign_ticket
from protocol.recipient import WinningTicket
from stepstream.anvil import free_port
from stepstream.chain import ChainError, http_web3
from stepstream.keys import PASSWORD_ENV, KeyFileError, load_private_key, write_keystore
from stepstream.settlement import REDEEM_GAS, EmbeddedChain, OnChain, settlement_for

pytestmark = pytest.mark.anyio


def winner(sender_key: bytes, recipient: str, nonce: int = 1) -> WinningTicket:
    rand = secrets.randbits(256)
    ticket = Ticket(
        recipient=recipient,
        sender=address_of(sender_key),
        face_value=10**15 + nonce,
        win_prob=MAX_UINT256,
        sender_nonce=nonce,
        recipient_rand_hash=recipient_rand_hash(rand),
    )
    return WinningTicket(ticket, sign_ticket(ticket, sender_key), rand)


# -- keys ---------------------------------------------------------------------------------


def test_keystore_with_password_file_or_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = secrets.token_bytes(32)
    path = tmp_path / "key.json"
    write_keystore(path, key, "correct horse", iterations=1024)
    (tmp_path / "pw").write_text("correct horse\n")
    assert load_private_key(path, tmp_path / "pw") == key
    monkeypatch.setenv(PASSWORD_ENV, "correct horse")
    assert load_private_key(path) == key


def test_key_errors_never_show_key_or_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = secrets.token_bytes(32)
    path = tmp_path / "key.json"
    write_keystore(path, key, "s3cret-pass", iterations=1024)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    messages = []
    with pytest.raises(KeyFileError) as caught:
        load_private_key(path)
    messages.append(str(caught.value))
    assert PASSWORD_ENV in messages[-1]
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    with pytest.raises(KeyFileError, match="wrong password") as caught:
        load_private_key(path)
    messages.append(str(caught.value))
    raw = tmp_path / "raw.key"
    raw.write_text(key.hex()[:-2] + "zz")  # a damaged raw key
    with pytest.raises(KeyFileError) as caught:
        load_private_key(raw)
    messages.append(str(caught.value))
    for text in messages:
        assert key.hex()[:16] not in text and "s3cret-pass" not in text


def test_key_never_in_reprs_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    chain = EmbeddedChain()
    key = secrets.token_bytes(32)
    settlement = chain.account(key)
    entry = ModelEntry("text-to-image", "m", False, 1, price_per_pixel_step=1)
    config = OrchestratorConfig([entry], private_key=key, settlement=settlement)
    with caplog.at_level(logging.DEBUG):
        orch = Orchestrator(config)
        logging.getLogger("test").info("%r %r %s", config, settlement, orch.describe_settlement())
    text = repr(config) + repr(settlement) + repr(settlement.client) + caplog.text
    assert address_of(key) in text  # the address is public...
    assert key.hex() not in text and key.hex().upper() not in text  # ...the key is not


# -- settlement choice ------------------------------------------------------------------------


def test_command_line_settlement_choices() -> None:
    key = secrets.token_bytes(32)
    offchain = settlement_for(None, None, key)
    assert not offchain.redeems and "no chain configured" in offchain.describe()
    with pytest.raises(ChainError, match="needs --ticket-broker"):
        settlement_for("http://127.0.0.1:1", None, key)
    with pytest.raises(ChainError, match="cannot reach"):
        settlement_for(f"http://127.0.0.1:{free_port()}", "0x" + "11" * 20, key)


async def test_face_value_stays_above_redemption_cost() -> None:
    chain = EmbeddedChain()
    key = secrets.token_bytes(32)
    entry = ModelEntry("text-to-image", "m", False, 1, price_per_pixel_step=1)
    config = OrchestratorConfig(
        [entry], private_key=key, settlement=chain.account(key), face_value=1
    )
    orch = Orchestrator(config)
    eth = chain.w3.eth
    cost = REDEEM_GAS * (eth.get_block("latest")["baseFeePerGas"] + eth.max_priority_fee)
    assert cost > 0
    assert await orch.face_value() == 100 * cost
    # A window cheaper than that is paid by a ticket with the floor's face value.
    params = await orch._job_params(bytes(19) + b"\x01", window_fee=1000)
    assert params.face_value == 100 * cost and params.win_prob < MAX_UINT256


# -- winner queue and redeemer ----------------------------------------------------------------


def test_winner_queue_survives_reopen(tmp_path: Path) -> None:
    db = tmp_path / "winners.sqlite"
    sender = secrets.token_bytes(32)
    recipient = address_of(secrets.token_bytes(32))
    winners = [winner(sender, recipient, n) for n in (1, 2)]
    queue = WinnerQueue(db)
    queue.add(winners)
    queue.add(winners[:1])  # queuing the same ticket again changes nothing
    queue.mark_redeemed(winners[1].ticket.hash(), "0xabc", 5)
    queue.close()  # as good as a crash: every add was committed with synchronous=FULL

    reopened = WinnerQueue(db)
    rows = reopened.all()
    assert [r.winner for r in rows] == winners
    assert [r.status for r in rows] == [PENDING, REDEEMED]
    assert reopened.pending_face_value(address_of(sender)) == winners[0].ticket.face_value
    assert reopened.counts() == {PENDING: 1, REDEEMED: 1, FAILED: 0}


def test_redeemer_backs_off_then_gives_up_when_the_node_is_down(tmp_path: Path) -> None:
    """A real but unreachable node: each failure is retried later, then kept as failed."""
    chain = EmbeddedChain()
    down = OnChain(
        http_web3(f"http://127.0.0.1:{free_port()}", timeout_s=2),
        chain.broker_address,
        secrets.token_bytes(32),
    )
    queue = WinnerQueue(tmp_path / "w.sqlite")
    queue.add([winner(secrets.token_bytes(32), down.account)])
    now = [1000.0]
    redeemer = Redeemer(queue, down, max_attempts=4, base_delay=2, clock=lambda: now[0])
    seen = []
    for _ in range(4):
        (item,) = queue.due(now[0])
        redeemer.settle(item)
        (row,) = queue.all()
        seen.append((row.status, row.attempts, row.next_attempt - now[0]))
        assert "ConnectionError" in (row.last_error or "") or "cannot" in (row.last_error or "")
        now[0] = row.next_attempt
    assert seen == [
        (PENDING, 1, 2.0),
        (PENDING, 2, 4.0),
        (PENDING, 3, 8.0),
        (FAILED, 4, seen[3][2]),
    ]
    assert queue.due(now[0] + 10**6) == []


async def test_queued_winners_are_redeemed_by_a_restarted_orchestrator(tmp_path: Path) -> None:
    """Winners pending in the queue file at start-up are redeemed once the server runs."""
    chain = EmbeddedChain()
    o_key, b_key = secrets.token_bytes(32), secrets.token_bytes(32)
    for key in (o_key, b_key):
        chain.fund(address_of(key), 10**19)
    chain.account(b_key).fund_deposit_and_reserve(10**18, 10**18)
    db = tmp_path / "winners.sqlite"
    queue = WinnerQueue(db)
    queue.add([winner(b_key, address_of(o_key), n) for n in (1, 2)])
    queue.close()
    entry = ModelEntry("text-to-image", "m", False, 1, price_per_pixel_step=1)
    orch = Orchestrator(
        OrchestratorConfig(
            [entry], private_key=o_key, settlement=chain.account(o_key), winners_db=db
        )
    )
    async with orch.serve("127.0.0.1", 0):
        with anyio.fail_after(60):
            await orch.redeemer.wait_settled()
    assert orch.winners.counts() == {PENDING: 0, REDEEMED: 2, FAILED: 0}
    assert all(chain.account(o_key).is_redeemed(r.ticket_hash) for r in orch.winners.all())
    assert json.dumps(orch.winners.counts())


def test_ticket_bench_reports_rates_against_raw_coincurve() -> None:
    from stepstream.bench_tickets import measure, report

    rates = measure(seconds=0.05)
    assert min(rates.sign, rates.verify, rates.raw_sign, rates.raw_recover) > 0
    assert "x raw coincurve" in report(rates)
