"""Find, install and run a local anvil node for integration tests and demos.

Why: the embedded py-evm chain proves the contract logic, but only a real
JSON-RPC node proves the client's raw-transaction path. Foundry publishes
anvil on npm (`@foundry-rs/anvil`, with the native binary in a per-platform
optional dependency), so it installs into a project-local `.tools/` folder
with nothing but npm, and no global state is touched.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "ANVIL_NPM_SPEC",
    "AnvilError",
    "find_anvil",
    "find_or_install_anvil",
    "free_port",
    "run_anvil",
]

ANVIL_NPM_SPEC = "@foundry-rs/anvil@1.7.1"
"""Pinned npm package: a known version keeps test behaviour reproducible."""

PROJECT_ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT_S = 300.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0

_NPM_PLATFORMS = {"linux": "linux", "darwin": "darwin", "win32": "win32"}
_NPM_ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class AnvilError(RuntimeError):
    """anvil could not be found, installed or started."""


def _exe(name: str) -> str:
    return f"{name}.exe" if sys.platform == "win32" else name


def _candidates(tools: Path) -> list[Path]:
    """Where an npm install under `tools` puts anvil: native binary first, then the
    node wrapper (which only forwards to the native binary anyway)."""
    modules = tools / "node_modules"
    found = []
    osname = _NPM_PLATFORMS.get(sys.platform)
    arch = _NPM_ARCHES.get(platform.machine().lower())
    if osname and arch:
        found.append(modules / "@foundry-rs" / f"anvil-{osname}-{arch}" / "bin" / _exe("anvil"))
    found.append(modules / ".bin" / _exe("anvil"))
    return found


def _works(binary: Path) -> bool:
    """True if `binary --version` runs; guards against half-finished installs."""
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def find_anvil(project_root: Path | str = PROJECT_ROOT) -> Path | None:
    """A working anvil from `<root>/.tools`, else from PATH, else None (installs nothing)."""
    for path in _candidates(Path(project_root) / ".tools"):
        if path.is_file() and os.access(path, os.X_OK) and _works(path):
            return path
    on_path = shutil.which("anvil")
    if on_path and _works(Path(on_path)):
        return Path(on_path)
    return None


def find_or_install_anvil(project_root: Path | str = PROJECT_ROOT) -> Path:
    """Return a working anvil binary, installing `ANVIL_NPM_SPEC` into `<root>/.tools` if needed.

    Raises AnvilError when npm is missing or the install does not yield a working binary.
    """
    found = find_anvil(project_root)
    if found is not None:
        return found
    npm = shutil.which("npm")
    if npm is None:
        raise AnvilError("anvil not found and npm is not installed to fetch it")
    tools = Path(project_root) / ".tools"
    tools.mkdir(parents=True, exist_ok=True)
    cmd = [npm, "install", "--prefix", str(tools), "--no-audit", "--no-fund", ANVIL_NPM_SPEC]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise AnvilError(f"npm install {ANVIL_NPM_SPEC} timed out") from exc
    if done.returncode != 0:
        raise AnvilError(
            f"npm install {ANVIL_NPM_SPEC} failed ({done.returncode}): {done.stderr[-2000:]}"
        )
    found = find_anvil(project_root)
    if found is None:
        raise AnvilError(f"npm installed {ANVIL_NPM_SPEC} but no runnable anvil is in {tools}")
    return found


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (racy by nature, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _block_number(url: str) -> int | None:
    """eth_blockNumber, or None while the node is not answering yet."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []})
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=1.0) as response:
            return int(json.loads(response.read())["result"], 16)
    except (OSError, ValueError, KeyError, urllib.error.URLError):
        return None


@contextmanager
def run_anvil(
    port: int | None = None,
    *,
    binary: Path | None = None,
    project_root: Path | str = PROJECT_ROOT,
    start_timeout_s: float = START_TIMEOUT_S,
    extra_args: tuple[str, ...] = (),
) -> Iterator[str]:
    """Run anvil on 127.0.0.1 and yield its JSON-RPC URL; stop it on exit.

    Readiness is polled with eth_blockNumber until `start_timeout_s`, so a
    failed start is reported with anvil's own output instead of hanging.
    """
    exe = binary or find_or_install_anvil(project_root)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(exe), "--host", "127.0.0.1", "--port", str(port), *extra_args]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + start_timeout_s
            delay = 0.02
            while _block_number(url) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read()[-2000:].decode(errors="replace")
                    state = f"exited {proc.returncode}" if proc.poll() is not None else "timed out"
                    raise AnvilError(f"anvil on {url} {state} before answering: {tail}")
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
            yield url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
