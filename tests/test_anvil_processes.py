"""Orchestrator and broadcaster as separate processes, settling on a real anvil node.

`stepstream orchestrator` and `stepstream generate` talk over loopback and
both reach anvil with --eth-url; tickets are sure winners (a face value below
one window's fee, and no redeem-cost floor on this test chain), so every
ticket is redeemed. The second test kills the orchestrator between a win and
its redemption and restarts it.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from web3 import Web3

from orchestrator.winners import PENDING, REDEEMED, WinnerQueue
from pipelines.tiny import TINY_SD
from protocol.pm import Ticket, address_of
from stepstream.anvil import AnvilError, find_anvil, find_or_install_anvil, run_anvil
from stepstream.chain import ChainError, TicketBrokerClient, fund_account, http_web3
from stepstream.keys import write_new_key

ETH = 10**18
ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def anvil_url() -> Iterator[str]:
    if find_anvil() is None and shutil.which("npm") is None:
        pytest.skip("anvil is not installed and npm is not available to install it")
    try:
        binary = find_or_install_anvil()
    except AnvilError as exc:
        pytest.fail(f"could not install anvil with npm: {exc}")
    with run_anvil(binary=binary) as url:
        yield url


class Lines:
    """A process's output lines, read by a thread, awaited with a timeout."""

    def __init__(self, stream: object) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self._queue.put(line)

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r}; saw:\n{''.join(self.seen)}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            found = regex.search(line)
            if found:
                return found


@dataclass
class Setup:
    url: str
    w3: Web3
    broker: str
    o_key: bytes
    b_key: bytes
    tmp: Path

    def o_client(self) -> TicketBrokerClient:
        return TicketBrokerClient(self.w3, self.broker, self.o_key)

    def chain_flags(self) -> list[str]:
        return ["--eth-url", self.url, "--ticket-broker", self.broker]


def make_setup(url: str, tmp: Path) -> Setup:
    w3 = http_web3(url)
    keys = [write_new_key(tmp / name) for name in ("deployer.key", "o.key", "b.key")]
    for key in keys:
        fund_account(w3, address_of(key), 100 * ETH)
    broker = TicketBrokerClient.deploy(w3, keys[0]).address
    (tmp / "aiModels.json").write_text(
        json.dumps(
            [
                {
                    "pipeline": "text-to-image",
                    "model_id": TINY_SD,
                    "warm": True,
                    "price_per_unit": 4_768_371,
                    "pixels_per_unit": 1,
                }
            ]
        )
    )
    return Setup(url, w3, broker, keys[1], keys[2], tmp)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stepstream.cli", *args]


def start_orchestrator(s: Setup) -> tuple[subprocess.Popen[str], Lines, str]:
    proc = subprocess.Popen(
        cli(
            "orchestrator",
            "--models",
            str(s.tmp / "aiModels.json"),
            "--key",
            str(s.tmp / "o.key"),
            "--port",
            "0",
            "--data-dir",
            str(s.tmp / "data"),
            # Sure winners: the face value is below one window's fee.
            "--face-value",
            "1",
            "--redeem-cost-multiplier",
            "0",
            *s.chain_flags(),
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    url = out.expect(r"listening on (\S+)", START_TIMEOUT).group(1)
    return proc, err, url


def generate(s: Setup, url: str, *extra: str) -> str:
    done = subprocess.run(
        cli(
            "generate",
            "--orchestrator",
            url,
            "--model",
            TINY_SD,
            "--prompt",
            "a lighthouse",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "4",
            "--preview-every",
            "2",
            "--key",
            str(s.tmp / "b.key"),
            "--out",
            str(s.tmp / "out.png"),
            *s.chain_flags(),
            *extra,
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redeemed_events(s: Setup) -> list:
    broker = s.o_client().contract
    return broker.events.WinningTicketRedeemed.get_logs(from_block=0)


def redeemed_call(s: Setup, tx_hash: bytes) -> tuple[Ticket, bytes, int]:
    """The ticket, signature and rand of a mined redeemWinningTicket, from its input."""
    broker = s.o_client().contract
    _fn, args = broker.decode_function_input(s.w3.eth.get_transaction(tx_hash)["input"])
    t = args["_ticket"] if "_ticket" in args else next(iter(args.values()))
    values = list(t.values()) if isinstance(t, dict) else list(t)
    sig, rand = list(args.values())[1:3]
    aux = values[6]
    ticket = Ticket(
        recipient=values[0],
        sender=values[1],
        face_value=values[2],
        win_prob=values[3],
        sender_nonce=values[4],
        recipient_rand_hash=values[5],
        creation_round=int.from_bytes(aux[:32], "big") if aux else 0,
        creation_round_block_hash=aux[32:] if aux else bytes(32),
    )
    return ticket, bytes(sig), rand


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Bounded wait on another process's effect on the chain (no event to subscribe to)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_separate_processes_redeem_a_winner_on_anvil(anvil_url: str, tmp_path: Path) -> None:
    s = make_setup(anvil_url, tmp_path)
    o_address = address_of(s.o_key)
    before = s.w3.eth.get_balance(o_address)
    proc, err, url = start_orchestrator(s)
    try:
        err.expect(r"settling on http://127\.0\.0\.1")
        out = generate(s, url, "--deposit", str(ETH), "--reserve", str(ETH))
        assert f"deposit {ETH} wei, reserve {ETH} wei" in out
        assert "tickets                2 sent, 2 winners" in out
        for _ in range(2):
            err.expect(r"redeemed ticket 0x")
    finally:
        stop(proc)
    events = [e for e in redeemed_events(s) if e["args"]["recipient"] == o_address]
    assert len(events) == 2
    face = sum(e["args"]["faceValue"] for e in events)
    gas = 0
    for e in events:
        receipt = s.w3.eth.get_transaction_receipt(e["transactionHash"])
        gas += receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert s.w3.eth.get_balance(o_address) == before + face - gas
    # The same ticket again: the broker refuses it.
    ticket, sig, rand = redeemed_call(s, events[0]["transactionHash"])
    assert s.o_client().used_tickets(ticket.hash())
    with pytest.raises(ChainError, match="ticket is used"):
        s.o_client().redeem_winning_ticket(ticket, sig, rand)


def test_killed_orchestrator_redeems_queued_winner_once(anvil_url: str, tmp_path: Path) -> None:
    s = make_setup(anvil_url, tmp_path)
    TicketBrokerClient(s.w3, s.broker, s.b_key).fund_deposit_and_reserve(ETH, ETH)
    rpc = s.w3.provider.make_request  # type: ignore[union-attr]
    proc, err, url = start_orchestrator(s)
    try:
        # Blocks stop: the redemption the orchestrator sends will sit in the mempool.
        rpc("evm_setAutomine", [False])  # type: ignore[arg-type]
        out = generate(s, url, "--steps", "2")
        assert "tickets                1 sent, 1 winners" in out
        err.expect(r"redeeming ticket 0x")
        wait_until(
            lambda: s.w3.eth.get_block("pending")["transactions"] != [],
            30,
            "the redemption to reach the mempool",
        )
        proc.kill()  # SIGKILL: no clean-up, no chance to finish
        proc.wait()
    finally:
        stop(proc)
        # The crash loses the unmined transaction too; blocks resume.
        rpc("anvil_dropAllTransactions", [])  # type: ignore[arg-type]
        rpc("evm_setAutomine", [True])  # type: ignore[arg-type]

    db = next((tmp_path / "data").glob("winners-*.sqlite"))
    (row,) = WinnerQueue(db).all()
    assert row.status == PENDING
    assert not s.o_client().used_tickets(row.ticket_hash)
    before = s.w3.eth.get_balance(address_of(s.o_key))

    proc, err, url = start_orchestrator(s)
    try:
        err.expect(r"1 winning tickets from an earlier run are pending")
        err.expect(r"redeemed ticket 0x")
    finally:
        stop(proc)
    (row,) = WinnerQueue(db).all()
    assert row.status == REDEEMED and s.o_client().used_tickets(row.ticket_hash)
    events = redeemed_events(s)
    assert len(events) == 1
    receipt = s.w3.eth.get_transaction_receipt(events[0]["transactionHash"])
    gas = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    face = row.winner.ticket.face_value
    assert s.w3.eth.get_balance(address_of(s.o_key)) == before + face - gas
