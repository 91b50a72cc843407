"""bench/run_all.py shows a GPU figure as a result only when it measured this tree's code.

The GPU rows of bench/results.md come from files another machine wrote (bench/gpu_checks.sh). A
figure is this tree's only when the digest of the source it stored is this tree's; otherwise, or
when the file stores neither digest nor commit (the H100 files of 2026-11-27), the row says "not
measured on this commit" and the old figure appears only as history, with what it stored about
how it was made (the assumed sleeps of the old replay bench included). Dates come from the
files, never from their mtime.
"""

from __future__ import annotations

import json
import os

import pytest

from bench import run_all

HERE = {"source_digest": "sha256:" + "a" * 64, "commit": "1" * 40}
BUSY = {
    "gpu_busy_dit": {
        "unit": "fraction of wall",
        "baseline": 0.86,
        "ours": 0.95,
        "ratio": 1.10,
        "sleeps": {"claim_ms": 3.0},
    }
}


@pytest.fixture()
def gpu_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "GPU_RESULTS", tmp_path)
    (tmp_path / "gpu.txt").write_text("NVIDIA H200\n")
    return tmp_path


def _write(gpu_dir, data: dict) -> None:
    path = gpu_dir / "gpu_busy.json"
    path.write_text(json.dumps(data))
    os.utime(path, (0, 4_000_000_000))  # an mtime in 2096: no row may take its date from it


def test_a_file_without_provenance_is_history_not_a_result(gpu_dir):
    _write(gpu_dir, BUSY)
    lines, results, _ = run_all.recorded_gpu(HERE)
    row = results["gpu_busy_dit"]
    assert row["status"] == run_all.NOT_MEASURED and "ours" not in row
    assert row["history"]["ours"] == 0.95 and row["history"]["sleeps"] == {"claim_ms": 3.0}
    text = "\n".join(lines)
    assert "the file stores no commit and no source digest" in text
    assert "time.sleep" in text  # the assumed round trips are said, not dropped
    assert "2096" not in text


def test_a_figure_of_other_code_is_not_a_result(gpu_dir):
    other = {"measured_at": "2026-12-01T10:00:00+00:00", "commit": "2" * 40, "source_digest": "sha256:" + "b" * 64}
    _write(gpu_dir, {"gpu_busy_dit": {**BUSY["gpu_busy_dit"], **other}})
    lines, results, _ = run_all.recorded_gpu(HERE)
    assert results["gpu_busy_dit"]["status"] == run_all.NOT_MEASURED
    assert results["gpu_busy_dit"]["history"]["measured_at"] == "2026-12-01T10:00:00+00:00"
    assert "2026-12-01T10:00:00+00:00" in "\n".join(lines)


def test_a_figure_of_this_trees_code_is_a_result_with_its_date_and_commit(gpu_dir):
    mine = {"measured_at": "2026-12-04T05:00:00+00:00", "commit": HERE["commit"], **HERE}
    _write(gpu_dir, {"gpu_busy_dit": {**BUSY["gpu_busy_dit"], **mine}})
    lines, results, _ = run_all.recorded_gpu(HERE)
    row = results["gpu_busy_dit"]
    assert row["current"] is True and row["ours"] == 0.95
    assert row["measured_at"] == "2026-12-04T05:00:00+00:00" and row["commit"] == HERE["commit"]
    assert run_all.NOT_MEASURED not in "\n".join(line for line in lines if "gpu_busy_dit" in line)
