"""The `stepstream` command as a user runs it: separate processes on loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from broadcaster.image_files import read_parameters
from stepstream.processes import orchestrator_process


def stepstream(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stepstream", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def orchestrator_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with orchestrator_process(tmp_path_factory.mktemp("orchestrator")) as child:
        url = child.url
        yield url


def generate(url: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return stepstream(
        "generate", "--orchestrator", url, "--model", "stepstream/tiny-sd",
        "--prompt", "a lighthouse", "--width", "64", "--height", "64", "--steps", "6",
        "--preview-every", "4", "--seed", "3", "--out", str(out), *extra,
    )  # fmt: skip


def test_generate_writes_the_image_and_each_preview(orchestrator_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    done = generate(orchestrator_url, out)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as img:
        assert img.size == (64, 64)
        # Its parameters, as AUTOMATIC1111 writes them into a PNG text chunk.
        assert img.info["parameters"] == (
            "a lighthouse\nSteps: 6, CFG scale: 7.5, Seed: 3, Size: 64x64, "
            "Model: stepstream/tiny-sd"
        )
    previews = sorted(p.name for p in tmp_path.glob("out.preview-*.png"))
    assert previews == ["out.preview-004.png", "out.preview-006.png"]
    summary = done.stdout
    assert "wrote" in summary and "6 steps" in summary
    # The summary: seed, orchestrator, time to first preview, files, EV paid vs fee.
    assert "seed                   3" in summary
    assert f"orchestrator           {orchestrator_url} (0x" in summary
    assert "time to first preview  " in summary and "EV paid / fee" in summary
    files = summary.split("files", 1)[1]
    for name in ("out.png", "out.preview-004.png", "out.preview-006.png"):
        assert name in files


def test_generate_writes_jpeg_for_a_jpg_out(orchestrator_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out.jpg"
    # --orchestrators (as the gateway spells it) is the same flag, not --orchestrators-file.
    done = stepstream(
        "generate", "--orchestrators", orchestrator_url, "--model", "stepstream/tiny-sd",
        "--prompt", "a harbour", "--negative-prompt", "fog", "--width", "64", "--height", "64",
        "--steps", "2", "--preview-every", "2", "--seed", "9", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Image.open(out) as img:
        assert img.format == "JPEG" and img.size == (64, 64)
    assert read_parameters(out.read_bytes()) == (
        "a harbour\nNegative prompt: fog\n"
        "Steps: 2, CFG scale: 7.5, Seed: 9, Size: 64x64, Model: stepstream/tiny-sd"
    )
    with Image.open(tmp_path / "out.preview-002.jpg") as img:
        assert img.format == "JPEG"


def test_generate_refuses_a_price_above_its_maximum(orchestrator_url: str, tmp_path: Path) -> None:
    done = generate(orchestrator_url, tmp_path / "x.png", "--max-price", "1/1000")
    assert done.returncode == 3
    assert "price_too_high" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_generate_reports_bad_requests_and_unreachable_orchestrators(
    orchestrator_url: str, tmp_path: Path
) -> None:
    bad = generate(orchestrator_url, tmp_path / "x.png", "--width", "65")
    assert bad.returncode == 2  # a user error, found before any orchestrator is asked
    assert "--width" in bad.stderr and "Traceback" not in bad.stderr
    gone = generate("ws://127.0.0.1:9", tmp_path / "y.png")
    assert gone.returncode == 1
    assert "cannot reach ws://127.0.0.1:9" in gone.stderr and "Traceback" not in gone.stderr


def test_orchestrator_refuses_a_bad_models_file(tmp_path: Path) -> None:
    models = tmp_path / "aiModels.json"
    models.write_text('[{"pipeline": "text-to-image", "model_id": "m", "currency": "USD"}]')
    key = tmp_path / "key"
    key.write_text("0x" + "11" * 32)
    done = stepstream("orchestrator", "--models", str(models), "--key", str(key), "--port", "0")
    assert done.returncode == 2
    assert "currency 'USD' is not supported yet" in done.stderr
    assert "Traceback" not in done.stderr
    key.write_text("not a key")
    models.write_text('[{"pipeline": "text-to-image", "model_id": "m"}]')
    done = stepstream("orchestrator", "--models", str(models), "--key", str(key), "--port", "0")
    assert done.returncode == 2 and "does not hold a hex private key" in done.stderr
