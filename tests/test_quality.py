"""`tools/quality.py --quick`: the multi-seed quality benchmark at tiny size, and its resume."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

RECORD_FIELDS = {"student", "recipe", "seed", "targets", "mAP", "AP", "params", "train_s", "step_s"}


@pytest.fixture(scope="module")
def quick_quality(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("quality_out"), tmp_path_factory.mktemp("quality_work")
    command = [sys.executable, "tools/quality.py", "--quick", "--out-dir", str(out), "--work-dir", str(work)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return command, out


def test_quick_quality_writes_its_records_table_and_plot(quick_quality):
    _, out = quick_quality
    state = json.loads((out / "quality.json").read_text())
    assert 0 < state["teacher"]["mAP"] <= 1 and state["teacher"]["params"] > 0
    runs = {(r["student"], r["recipe"], r["targets"]): r for r in state["runs"]}
    assert set(runs) == {("half", "no-kd", "none"), ("half", "pkd=5", "cache")}
    for record in runs.values():
        assert RECORD_FIELDS <= set(record) and record["seed"] == 0
        assert 0.0 <= record["mAP"] <= 1.0 and set(record["AP"]) == {"car", "truck", "bicycle", "pedestrian",
                                                                       "barrier", "traffic_cone"}
        assert record["params"] < state["teacher"]["params"] and record["train_s"] > 0 and record["step_s"] > 0
    report = (out / "QUALITY.md").read_text()
    for (student, recipe, targets), record in runs.items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {student} | `{recipe}` | {targets} |"))
        assert f"{record['mAP']:.4f}" in row
        retention = record["mAP"] / state["teacher"]["mAP"]
        assert f"{retention:.3f}" in row
    assert "gain over no-KD" in report and "QUICK" in report
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_quality_rerun_reuses_completed_runs(quick_quality):
    command, out = quick_quality
    before = json.loads((out / "quality.json").read_text())
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads((out / "quality.json").read_text())
    assert after["runs"] == before["runs"]  # same records, none retrained
    assert "starting" not in result.stderr
