"""Keys, the durable winner queue, the redeemer's retries and batches, the face value floor,
the max float and stake read from the chain."""

from __future__ import annotations

import json
import logging
import secrets
from fractions import Fraction
from pathlib import Path

import anyio
import pytest

from orchestrator.config import ModelEntry
from orchestrator.server import Orchestrator, OrchestratorConfig
from protocol.errors import ErrorCode
from protocol.pm import MAX_UINT256, Ticket, address_of, recipient_rand_hash, sign_ticket
from protocol.recipient import PaymentReceipt, WinningTicket
from protocol.sender import TicketSender
from settlement.chain import EmbeddedChain, OnChain, settlement_for
from settlement.eth import ChainError, http_web3
from settlement.redeemer import Redeemer
from settlement.sender_monitor import SenderMonitor
from settlement.stakes import ChainStakes
from settlement.winners import FAILED, PENDING, REDEEMED, WinnerQueue
from stepstream.anvil import free_port
from stepstream.keys import PASSWORD_ENV, KeyFileError, load_private_key, write_keystore

pytestmark = pytest.mark.anyio


def winner(
    sender_key: bytes, recipient: str, nonce: int = 1, chain: OnChain | None = None
) -> WinningTicket:
    """A sure winner, in the chain's last initialized round when a chain is given."""
    issue = chain.issue_round() if chain is not None else None
    rand = secrets.randbits(256)
    ticket = Ticket(
        recipient=recipient,
        sender=address_of(sender_key),
        face_value=10**15 + nonce,
        win_prob=MAX_UINT256,
        sender_nonce=nonce,
        recipient_rand_hash=recipient_rand_hash(rand),
        creation_round=issue.round if issue else 0,
        creation_round_block_hash=issue.block_hash if issue else bytes(32),
    )
    return WinningTicket(ticket, sign_ticket(ticket, sender_key), rand)


def funded(chain: EmbeddedChain, deposit: int = 0, reserve: int = 0) -> bytes:
    """A fresh key with ether and, unless zero, a deposit and reserve."""
    key = secrets.token_bytes(32)
    chain.fund(address_of(key), 10**19)
    if deposit or reserve:
        chain.account(key).fund_deposit_and_reserve(deposit, reserve)
    return key


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
        logging.getLogger("test").info("%r %r %s", config, settlement, orch.cashier.describe())
    text = repr(config) + repr(settlement) + repr(settlement.broker) + caplog.text
    assert address_of(key) in text  # the address is public...
    assert key.hex() not in text and key.hex().upper() not in text  # ...the key is not


# -- settlement choice ------------------------------------------------------------------------


def test_command_line_settlement_choices() -> None:
    key = secrets.token_bytes(32)
    offchain = settlement_for(None, key)
    assert not offchain.redeems and "no chain configured" in offchain.describe()
    with pytest.raises(ChainError, match="needs --eth-controller"):
        settlement_for("http://127.0.0.1:1", key)
    with pytest.raises(ChainError, match="need --eth-url"):
        settlement_for(None, key, controller="0x" + "11" * 20)
    with pytest.raises(ChainError, match="cannot reach"):
        settlement_for(f"http://127.0.0.1:{free_port()}", key, controller="0x" + "11" * 20)


async def test_face_value_stays_above_redemption_cost() -> None:
    """The floor uses the gas a redemption takes on this broker, measured, not assumed."""
    chain = EmbeddedChain()
    key = funded(chain)
    chain.register(address_of(key))
    o_chain = chain.account(key)
    entry = ModelEntry("text-to-image", "m", False, 1, price_per_pixel_step=1)
    config = OrchestratorConfig([entry], private_key=key, settlement=o_chain, face_value=1)
    orch = Orchestrator(config)
    gas = o_chain.redeem_gas()  # measured on this broker before any redemption
    # A real redemption there then uses no more than that, and not much less.
    b_key = funded(chain, deposit=10**18)
    redemption = o_chain.redeem(winner(b_key, address_of(key), chain=o_chain))
    assert gas * 3 // 4 < redemption.gas_used <= gas == o_chain.redeem_gas()
    eth = chain.w3.eth
    cost = gas * (eth.get_block("latest")["baseFeePerGas"] + eth.max_priority_fee)
    assert cost > 0
    assert await orch.cashier.face_value() == 100 * cost
    # A window cheaper than that is paid by a ticket with the floor's face value.
    params = await orch.cashier.job_params(bytes(19) + b"\x01", window_fee=1000)
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
    assert chain.deployment is not None
    down = OnChain(
        http_web3(f"http://127.0.0.1:{free_port()}", timeout_s=2),
        chain.deployment,
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
    o_key, b_key = funded(chain), funded(chain, 10**18, 10**18)
    chain.register(address_of(o_key))
    db = tmp_path / "winners.sqlite"
    queue = WinnerQueue(db)
    o_chain = chain.account(o_key)
    queue.add([winner(b_key, address_of(o_key), n, o_chain) for n in (1, 2)])
    queue.close()
    entry = ModelEntry("text-to-image", "m", False, 1, price_per_pixel_step=1)
    orch = Orchestrator(
        OrchestratorConfig(
            [entry], private_key=o_key, settlement=chain.account(o_key), winners_db=db
        )
    )
    async with orch.serve("127.0.0.1", 0):
        with anyio.fail_after(60):
            await orch.cashier.redeemer.wait_settled()
    assert orch.cashier.winners.counts() == {PENDING: 0, REDEEMED: 2, FAILED: 0}
    assert all(chain.account(o_key).is_redeemed(r.ticket_hash) for r in orch.cashier.winners.all())
    assert json.dumps(orch.cashier.winners.counts())
    # The fees earned are what the chain records, in the log and in the metrics.
    face = sum(r.winner.ticket.face_value for r in orch.cashier.winners.all())
    assert o_chain.fee_pool() == face == orch.cashier.redeemer.fee_pool
    assert orch.metrics.fee_pool._value.get() == face  # noqa: SLF001
    assert orch.metrics.redemptions._value.get() == 2  # noqa: SLF001


def test_max_float_follows_the_reserve_share(tmp_path: Path) -> None:
    """Pool size 1: deposit + the whole reserve. Pool size 100: deposit + 1 % of it."""
    chain = EmbeddedChain()
    o_key = funded(chain)
    chain.register(address_of(o_key))
    b_key = funded(chain, deposit=10**16, reserve=10**17)
    b_address = address_of(b_key)
    monitor = SenderMonitor(chain.account(o_key), WinnerQueue(tmp_path / "w.sqlite"))
    assert monitor.max_float(b_address) == 10**16 + 10**17
    for _ in range(99):
        chain.register(address_of(secrets.token_bytes(32)))
    assert monitor.max_float(b_address) == 10**16 + 10**15
    # A queued winner not yet redeemed is owed out of that.
    monitor.winners.add([winner(b_key, address_of(o_key), chain=chain.account(o_key))])
    assert monitor.max_float(b_address) == 10**16 + 10**15 - (10**15 + 1)


async def test_a_ticket_over_the_reserve_share_is_refused() -> None:
    """The 0.05 ETH ticket that used to be consumed for 0.011: refused before any credit."""
    chain = EmbeddedChain()
    o_key = funded(chain)
    chain.register(address_of(o_key))
    b_key = funded(chain, deposit=10**16, reserve=10**17)
    entry = ModelEntry("text-to-image", "m", False, 1, price_per_pixel_step=1)
    orch = Orchestrator(
        OrchestratorConfig(
            [entry], private_key=o_key, settlement=chain.account(o_key), face_value=5 * 10**16
        )
    )
    sender = TicketSender(b_key)

    async def pay_one() -> PaymentReceipt:
        params = await orch.cashier.job_params(sender.address_bytes, window_fee=Fraction(10**9))
        assert params.face_value == 5 * 10**16 and params.creation_round > 0
        receipt = await orch.cashier.receive(sender.pay("j", params, 1))
        assert not receipt.winners  # 1 in 50 million: nothing queued to muddle the float
        return receipt

    receipt = await pay_one()
    assert receipt.error is None and receipt.accepted == 1  # pool of 1: 0.11 ETH covers it
    for _ in range(99):
        chain.register(address_of(secrets.token_bytes(32)))
    receipt = await pay_one()
    assert receipt.error is not None and receipt.accepted == 0 and receipt.ev == 0
    assert receipt.error.code == ErrorCode.SENDER_INSUFFICIENT_FUNDS


def test_a_batch_with_one_bad_winner_redeems_all_the_good_ones(tmp_path: Path) -> None:
    chain = EmbeddedChain()
    o_key, b_key = funded(chain), funded(chain, deposit=10**18)
    chain.register(address_of(o_key))
    o_chain = chain.account(o_key)
    winners = [winner(b_key, o_chain.account, n, o_chain) for n in range(1, 6)]
    bad = winners[2]
    winners[2] = WinningTicket(bad.ticket, bad.sig, bad.recipient_rand + 1)  # rand mismatch
    queue = WinnerQueue(tmp_path / "w.sqlite")
    queue.add(winners)
    redeemer = Redeemer(queue, o_chain, clock=lambda: 0.0)
    assert redeemer.settle_group(queue.due(0.0)) == 4
    rows = {r.ticket_hash: r for r in queue.all()}
    assert [rows[w.ticket.hash()].status for w in winners] == [
        REDEEMED, REDEEMED, PENDING, REDEEMED, REDEEMED
    ]  # fmt: skip
    left = rows[bad.ticket.hash()]
    assert left.attempts == 1 and "skipped by the batch" in (left.last_error or "")
    assert len({rows[w.ticket.hash()].tx_hash for w in winners if w is not winners[2]}) == 1
    assert o_chain.fee_pool() == sum(w.ticket.face_value for w in winners) - bad.ticket.face_value


def test_stake_for_selection_comes_from_the_bonding_manager() -> None:
    chain = EmbeddedChain()
    big, small, unknown = (address_of(secrets.token_bytes(32)) for _ in range(3))
    chain.register(big, 3 * 10**18)
    chain.register(small, 10**18)
    stakes = ChainStakes(chain.account(secrets.token_bytes(32)))
    as_bytes = {url: bytes.fromhex(a[2:]) for url, a in (("ws://a", big), ("ws://b", small))}
    stakes.refresh({**as_bytes, "ws://c": bytes.fromhex(unknown[2:])})
    assert dict(stakes) == {"ws://a": 3 * 10**18, "ws://b": 10**18, "ws://c": 0}


def test_ticket_bench_reports_rates_against_raw_coincurve() -> None:
    from stepstream.bench_tickets import measure, report

    rates = measure(seconds=0.05)
    assert min(rates.sign, rates.verify, rates.raw_sign, rates.raw_recover) > 0
    assert "x raw coincurve" in report(rates)
