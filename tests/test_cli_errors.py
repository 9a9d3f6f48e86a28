"""Errors that blame the right party, and the habits of a command line, as a user meets them.

User errors exit 2 naming the flag before any orchestrator is contacted
(a listening socket shows that nothing connected), and no refusal caused
by a request suspends an orchestrator. Ctrl-C ends every long-running
command with one line and no traceback. An orchestrator that accepts TCP
and closes is merely unreachable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broadcaster.discovery import Discovery
from broadcaster.failover import JobRunner
from protocol.job_events import JobError, JobResult
from protocol.pm import address_of
from stepstream.cli import _build_parser
from stepstream.keys import load_private_key
from stepstream.processes import orchestrator_process
from tests.conftest import RunningOrchestrator
from tests.failover_helpers import TEST_POLICY, collect, small
from tests.test_cli import stepstream

STEPSTREAM = [sys.executable, "-m", "stepstream"]


@pytest.fixture(scope="module")
def orchestrator_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with orchestrator_process(tmp_path_factory.mktemp("orchestrator")) as child:
        yield child.url


@contextlib.contextmanager
def listener() -> Iterator[socket.socket]:
    """A TCP port on loopback that nobody answers: whoever connects stays in its queue."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock
    finally:
        sock.close()


def nobody_connected(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        conn, _ = sock.accept()  # a finished connection waits here even if its peer left
    except BlockingIOError:
        return True
    conn.close()
    return False


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--steps", "0"], "--steps"),
        (["--preview-every", "0"], "--preview-every"),
        (["--seed", "-1"], "--seed"),
        (["--prompt", "x" * 5000], "--prompt"),
        (["--width", "65"], "--width"),
        (["--num-images", "17"], "--num-images"),
        (["--out", "x.gif"], "--out"),
    ],
)
def test_user_errors_exit_2_naming_the_flag_before_any_orchestrator_is_contacted(
    extra: list[str], flag: str, tmp_path: Path
) -> None:
    with listener() as sock:
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}"
        args = {"--prompt": "a lighthouse", "--out": str(tmp_path / "x.png")}
        for name, value in zip(extra[::2], extra[1::2], strict=True):
            args[name] = value
        done = stepstream(
            "generate", "--orchestrator", url, "--model", "stepstream/tiny-sd",
            "--metrics-db", str(tmp_path / "speeds.sqlite3"),
            *[x for kv in args.items() for x in kv],
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"stepstream generate: {flag}: ")
        assert nobody_connected(sock)
    # No runner was built: nothing measured, nothing suspended, nothing written.
    assert not (tmp_path / "speeds.sqlite3").exists()
    assert not (tmp_path / "x.png").exists()


@pytest.mark.anyio
async def test_a_refusal_caused_by_the_request_suspends_no_orchestrator(
    running: RunningOrchestrator,
) -> None:
    runner = JobRunner(Discovery([running.url], b"\x01" * 32), b"\x02" * 32, policy=TEST_POLICY)
    # The orchestrator refuses it (invalid_request: no such preview format) ...
    refused = await collect(runner, small(steps=2), 2, preview_format="bmp")
    assert isinstance(refused[-1], JobError) and "invalid_request" in refused[-1].message
    assert runner.suspensions.reason(running.url) is None
    # ... and a request the wire itself refuses is refused before any orchestrator is asked.
    before = len(running.orch.stats.outcomes)
    wire = await collect(runner, small(steps=2), 0)
    assert isinstance(wire[-1], JobError) and wire[-1].code == "invalid_field"
    assert "preview_every" in wire[-1].message
    assert len(running.orch.stats.outcomes) == before
    # The orchestrator was never blamed: the next job runs there.
    done = await collect(runner, small(steps=2), 2)
    assert isinstance(done[-1], JobResult)
    assert runner.suspensions.reason(running.url) is None


def test_an_orchestrator_that_closes_without_a_handshake_is_unreachable(tmp_path: Path) -> None:
    with listener() as sock:
        sock.settimeout(30)

        def close_each() -> None:
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = sock.accept()
                    conn.close()

        threading.Thread(target=close_each, daemon=True).start()
        done = stepstream(
            "generate", "--orchestrator", f"ws://127.0.0.1:{sock.getsockname()[1]}",
            "--model", "stepstream/tiny-sd", "--prompt", "x", "--width", "64", "--height", "64",
            "--steps", "2", "--out", str(tmp_path / "x.png"),
            "--metrics-db", str(tmp_path / "speeds.sqlite3"),
        )  # fmt: skip
    assert done.returncode == 1
    assert "unreachable" in done.stderr and "no WebSocket handshake" in done.stderr
    assert "Traceback" not in done.stderr


def _read_until(proc: subprocess.Popen[bytes], stream: int, marker: bytes) -> bytes:
    """Read the child's pipe until `marker` shows up (bounded by the test's timeout)."""
    seen = b""
    while marker not in seen:
        ready, _, _ = select.select([stream], [], [], 120)
        assert ready, f"no {marker!r} in {seen[-500:]!r}"
        chunk = os.read(stream, 65536)
        assert chunk, f"exited ({proc.wait()}) before {marker!r}: {seen[-2000:]!r}"
        seen += chunk
    return seen


def interrupted(
    args: list[str], ready: bytes, on_stderr: bool = False, signum: int = signal.SIGINT
) -> tuple[int, str]:
    """Start `stepstream ARGS` in its own process group, Ctrl-C it (the whole group, as a
    terminal does; or send `signum` to it) once `ready` is printed; its exit code and
    stderr."""
    proc = subprocess.Popen(
        [*STEPSTREAM, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        pipe = proc.stderr if on_stderr else proc.stdout
        early = _read_until(proc, pipe.fileno(), ready)
        os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, ((early if on_stderr else b"") + err).decode(errors="replace")


def test_ctrl_c_ends_every_command_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    key.write_text("0x" + "11" * 32)
    models = tmp_path / "aiModels.json"
    models.write_text(
        '[{"pipeline": "text-to-image", "model_id": "stepstream/tiny-sd", "warm": true,'
        ' "price_per_unit": 1, "pixels_per_unit": 1}]'
    )
    # An orchestrator (its managed runner shares its process group) ...
    code, err = interrupted(
        ["orchestrator", "--models", str(models), "--key", str(key), "--port", "0",
         "--data-dir", str(tmp_path / "data")],
        b"listening on ",
    )  # fmt: skip
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "stepstream orchestrator: interrupted"
    assert err.count("interrupted") == 1  # the runner it manages says nothing

    # ... a gateway ...
    code, err = interrupted(
        ["gateway", "--orchestrators", "ws://127.0.0.1:9", "--key", str(key), "--port", "0",
         "--outputs", str(tmp_path / "outputs"), "--metrics-db", str(tmp_path / "m.sqlite3"),
         "--max-price", "1"],
        b"gateway listening on ",
    )  # fmt: skip
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "stepstream gateway: interrupted"
    assert err.count("interrupted") == 1 and "ERROR" not in err


def test_sigterm_stops_the_gateway_in_order(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    key.write_text("0x" + "11" * 32)
    code, err = interrupted(
        ["gateway", "--orchestrators", "ws://127.0.0.1:9", "--key", str(key), "--port", "0",
         "--outputs", str(tmp_path / "outputs"), "--metrics-db", str(tmp_path / "m.sqlite3"),
         "--max-price", "1"],
        b"gateway listening on ",
        signum=signal.SIGTERM,
    )  # fmt: skip
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "ERROR" not in err, err


def test_ctrl_c_mid_job_ends_generate_with_one_line(orchestrator_url: str, tmp_path: Path) -> None:
    code, err = interrupted(
        ["generate", "--orchestrator", orchestrator_url, "--model", "stepstream/tiny-sd",
         "--prompt", "x", "--width", "64", "--height", "64", "--steps", "1000",
         "--preview-every", "1", "--out", str(tmp_path / "x.png"),
         "--metrics-db", str(tmp_path / "m.sqlite3")],
        b"generating",
        on_stderr=True,
    )  # fmt: skip
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "stepstream generate: interrupted"


def test_keys_new_writes_a_key_and_prints_its_address(tmp_path: Path) -> None:
    hex_key = tmp_path / "b.key"
    done = stepstream("keys", "new", str(hex_key))
    assert done.returncode == 0, done.stderr
    assert hex_key.read_text().startswith("0x") and oct(hex_key.stat().st_mode)[-3:] == "600"
    assert done.stdout.strip() == address_of(load_private_key(hex_key))
    again = stepstream("keys", "new", str(hex_key))
    assert again.returncode == 2 and "never overwritten" in again.stderr

    password = tmp_path / "pw"
    password.write_text("correct horse\n")
    store = tmp_path / "o.json"
    done = stepstream("keys", "new", str(store), "--keystore", "--key-password-file", str(password))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == address_of(load_private_key(store, password))
    shown = stepstream("keys", "address", str(store), "--key-password-file", str(password))
    assert shown.stdout == done.stdout
    bare = stepstream("keys", "new", str(tmp_path / "p.json"), "--keystore")
    assert bare.returncode == 2 and "password" in bare.stderr


def test_command_line_habits(tmp_path: Path) -> None:
    version = subprocess.run([*STEPSTREAM, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("stepstream 0.")
    # -v and -q are taken after the subcommand too.
    key = tmp_path / "k.key"
    key.write_text("0x" + "11" * 32)
    assert stepstream("keys", "address", str(key), "-q").stdout.strip() == address_of(
        bytes.fromhex("11" * 32)
    )
    # No abbreviations: a prefix of a flag is an error, not silently another flag.
    short = stepstream("generate", "--orchestrators-fi", "x", "--model", "m", "--prompt", "p",
                       "--out", "x.png")  # fmt: skip
    assert short.returncode == 2 and "unrecognized arguments: --orchestrators-fi" in short.stderr
    # Every option has a help line; --help shows defaults and the exit codes.
    help_text = stepstream("generate", "--help").stdout
    assert "(default: 50)" in help_text and "exit codes:" in help_text and "130" in help_text

    def options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    for where, inner in options(sub):
                        yield f"{name} {where}", inner
            elif action.option_strings:
                yield action.option_strings[-1], action

    missing = [where for where, action in options(_build_parser()) if not action.help]
    assert missing == []
