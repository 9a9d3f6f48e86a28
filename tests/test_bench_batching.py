"""`stepstream bench batching` times every batch size it is asked for and judges the gain."""

from __future__ import annotations

import re

import pytest

from stepstream.cli import main


def test_bench_batching_prints_a_row_per_batch_size_and_a_verdict(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "bench",
            "batching",
            "--steps",
            "2",
            "--runs",
            "1",
            "--batch-sizes",
            "1",
            "2",
            "--size",
            "64",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    rows = re.findall(
        r"^\s+(\d+)\s+[\d.]+ ms\s+([\d.]+)\s+([\d.]+)x\s+(yes|NO)$", out, re.MULTILINE
    )
    assert [int(batch) for batch, _, _, _ in rows] == [1, 2]
    assert float(rows[0][2]) == 1.0  # batch 1 is the baseline
    assert [same for *_, same in rows] == ["yes", "yes"]  # the batched bytes are alone's
    assert re.search(r"batching (pays|does not pay) here", out)


@pytest.mark.parametrize("flag", [["--batch-sizes", "1", "0"], ["--runs", "0"]])
def test_bench_refuses_a_batch_size_or_run_count_below_one(
    flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "batching", *flag])
    assert exit_.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
