"""Orchestrator and broadcaster as separate processes, settling on a real anvil node.

`stepstream deploy-broker` puts the project's contracts on anvil and prints
the Controller's address; `stepstream orchestrator` and `stepstream
generate` talk over loopback and both find the contracts through
`--eth-controller`. Tickets are sure winners (a face value below one
window's fee, and no redeem-cost floor on this test chain), so every ticket
is redeemed, into the orchestrator's fee pool. The second test kills the
orchestrator between a win and its redemption and restarts it.
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

from pipelines.tiny import TINY_SD
from protocol.pm import address_of
from settlement.chain import OnChain, connect_chain
from settlement.eth import ChainError, fund_account, http_web3
from settlement.winners import PENDING, REDEEMED, WinnerQueue
from stepstream.anvil import AnvilError, find_anvil, find_or_install_anvil, run_anvil
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
    controller: str
    o_key: bytes
    b_key: bytes
    tmp: Path

    def o_chain(self) -> OnChain:
        return connect_chain(self.url, self.o_key, controller=self.controller)

    def chain_flags(self) -> list[str]:
        return ["--eth-url", self.url, "--eth-controller", self.controller]

    def fee_pool(self) -> int:
        """The orchestrator's fees as the chain records them (BondingManager.pendingFees)."""
        return self.o_chain().fee_pool()


def make_setup(url: str, tmp: Path) -> Setup:
    w3 = http_web3(url)
    keys = [write_new_key(tmp / name) for name in ("deployer.key", "o.key", "b.key")]
    for key in keys:
        fund_account(w3, address_of(key), 100 * ETH)
    deployed = subprocess.run(
        cli(
            "deploy-broker",
            "--eth-url",
            url,
            "--key",
            str(tmp / "deployer.key"),
            "--transcoder",
            address_of(keys[1]),
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert deployed.returncode == 0, deployed.stderr
    controller = deployed.stdout.strip()
    assert re.fullmatch(r"0x[0-9a-fA-F]{40}", controller), deployed.stdout
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
    return Setup(url, w3, controller, keys[1], keys[2], tmp)


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
            "--initialize-round",
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
    broker = s.o_chain().broker.contract
    return broker.events.WinningTicketRedeemed.get_logs(from_block=0)


def queued(s: Setup) -> WinnerQueue:
    return WinnerQueue(next((s.tmp / "data").glob("winners-*.sqlite")))


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Bounded wait on another process's effect on the chain (no event to subscribe to)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_separate_processes_redeem_winners_into_the_fee_pool(
    anvil_url: str, tmp_path: Path
) -> None:
    s = make_setup(anvil_url, tmp_path)
    o_address = address_of(s.o_key)
    proc, err, url = start_orchestrator(s)
    try:
        err.expect(r"one redemption takes \d+ gas")  # measured on this broker at start-up
        err.expect(r"settling on http://127\.0\.0\.1.*Controller " + s.controller)
        fees_before = s.fee_pool()
        out = generate(s, url, "--deposit", str(ETH), "--reserve", str(ETH))
        assert f"deposit {ETH} wei, reserve {ETH} wei" in out
        assert "tickets                2 sent, 2 winners" in out
        assert f"{url} has stake {ETH} wei" in out  # read from the BondingManager
        for _ in range(2):
            err.expect(r"redeemed ticket 0x")
        err.expect(r"fee pool on chain: \d+ wei")
    finally:
        stop(proc)
    events = [e for e in redeemed_events(s) if e["args"]["recipient"] == o_address]
    assert len(events) == 2
    face = sum(e["args"]["faceValue"] for e in events)
    assert face > 0 and s.fee_pool() == fees_before + face
    # The same ticket again: the broker refuses it.
    rows = queued(s).all()
    assert [r.status for r in rows] == [REDEEMED, REDEEMED]
    winner = rows[0].winner
    o_chain = s.o_chain()
    assert o_chain.is_redeemed(winner.ticket.hash())
    with pytest.raises(ChainError, match="ticket is used"):
        o_chain.redeem(winner)
    assert s.fee_pool() == fees_before + face


def test_killed_orchestrator_redeems_queued_winner_once(anvil_url: str, tmp_path: Path) -> None:
    s = make_setup(anvil_url, tmp_path)
    connect_chain(s.url, s.b_key, controller=s.controller).fund_deposit_and_reserve(ETH, ETH)
    rpc = s.w3.provider.make_request  # type: ignore[union-attr]
    proc, err, url = start_orchestrator(s)
    try:
        err.expect(r"one redemption takes \d+ gas")
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

    (row,) = queued(s).all()
    assert row.status == PENDING
    assert not s.o_chain().is_redeemed(row.ticket_hash)
    fees_before = s.fee_pool()

    # Restarted with a warm model that cannot load: it says so and serves on, and the
    # winner left pending is redeemed all the same (the redeemer starts before any model).
    broken = {"pipeline": "text-to-image", "model_id": str(tmp_path / "no-such-model"),
              "warm": True, "price_per_unit": 1, "pixels_per_unit": 1}  # fmt: skip
    (s.tmp / "aiModels.json").write_text(json.dumps([broken]))
    proc, err, url = start_orchestrator(s)
    try:
        err.expect(r"1 winning tickets from an earlier run are pending")
        err.expect(r"redeemed ticket 0x")
        # Logged before `listening on`, which start_orchestrator waited for.
        if not any("cannot load warm model" in line for line in err.seen):
            err.expect(r"cannot load warm model")
        assert proc.poll() is None
    finally:
        stop(proc)
    (row,) = queued(s).all()
    assert row.status == REDEEMED and s.o_chain().is_redeemed(row.ticket_hash)
    assert len(redeemed_events(s)) == 1
    assert s.fee_pool() == fees_before + row.winner.ticket.face_value


def test_deploy_broker_registers_transcoders_on_an_existing_set(
    anvil_url: str, tmp_path: Path
) -> None:
    s = make_setup(anvil_url, tmp_path)
    newcomer = address_of(write_new_key(tmp_path / "n.key"))

    def deploy(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli(
                "deploy-broker", "--eth-url", s.url, "--key", str(tmp_path / "deployer.key"), *extra
            ),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )

    bad = deploy("--eth-controller", s.controller, "--transcoder", f"{newcomer}=lots")
    assert bad.returncode == 2 and "not a whole number" in bad.stderr
    assert "Traceback" not in bad.stderr
    done = deploy("--eth-controller", s.controller, "--transcoder", f"{newcomer}=5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == s.controller  # nothing new deployed
    chain = s.o_chain()
    assert chain.transcoder_stake(newcomer) == 5 and chain.bonding.pool_size() == 2


def test_an_orchestrator_the_chain_cannot_pay_says_so_at_start(
    anvil_url: str, tmp_path: Path
) -> None:
    """Not an active transcoder: its winners could never be credited, so it does not start."""
    s = make_setup(anvil_url, tmp_path)
    done = subprocess.run(
        cli(
            "orchestrator",
            "--models",
            str(tmp_path / "aiModels.json"),
            "--key",
            str(tmp_path / "deployer.key"),  # funded, but not registered as a transcoder
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            *s.chain_flags(),
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert done.returncode == 2
    assert "cannot measure redemption gas" in done.stderr
    assert "transcoder must be registered" in done.stderr and "Traceback" not in done.stderr
