"""`tools/demo.sh --quick`: the README's main job, whole chain at tiny size, on the shipped teacher."""
from __future__ import annotations

import json
import os
import re
import subprocess

import matplotlib.image
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # the whole chain, ~10 minutes

TEACHER = REPO / "checkpoints" / "demo_teacher_pillar.pth"
MODELS = ("teacher", "half_kd", "slim_kd", "half_nokd")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    assert TEACHER.is_file(), f"the shipped demo teacher {TEACHER} is missing (tools/train_demo_teacher.sh makes it)"
    work = tmp_path_factory.mktemp("demo_quick")
    result = subprocess.run(["bash", "tools/demo.sh", "--quick"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "DEMO_WORK_DIR": str(work)}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work


def test_quick_demo_reports_every_model_from_its_own_run(quick_demo):
    work = quick_demo
    report = (work / "report.md").read_text()
    numbers = json.loads((work / "report.json").read_text())
    for name in MODELS:
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert int(cells[3].replace(",", "")) == numbers[name]["params"]
        assert float(cells[5]) == pytest.approx(numbers[name]["latency_ms"], abs=0.05) and float(cells[5]) > 0
        assert 0.0 <= numbers[name]["metrics"]["mAP"] <= 1.0
        assert f"{numbers[name]['metrics']['mAP']:.3f}" == cells[6]
    teacher_params = numbers["teacher"]["params"]
    assert numbers["slim_kd"]["params"] < numbers["half_kd"]["params"] <= 0.5 * teacher_params
    steps = numbers["step_time_s"]
    assert all(value > 0 for value in steps.values())
    assert f"**{steps['online_kd'] / steps['cached_kd']:.2f}x**" in report
    assert re.search(r"\*\*\d+ s\*\* \(\d+ min \d\d s\)", report), "the run's own wall time is missing"
    stages = [line.split("\t")[0] for line in (work / "timings.tsv").read_text().splitlines()]
    # the trainings run two at a time (either of a pair may finish first), the rest one after the other
    assert stages[:3] == ["generate", "build", "verify"] and stages[-2:] == ["deploy", "report"]
    assert set(stages[3:5]) == {"train_half_kd", "train_half_nokd"}
    assert set(stages[5:7]) == {"train_slim_kd", "train_half_online"}
    for run in ("student_half_kd", "student_half_nokd", "student_slim_kd", "student_half_online"):
        assert "Saving checkpoint" in (work / run / "console.log").read_text(), run


def test_quick_demo_report_holds_the_deployment_table_its_run_measured(quick_demo):
    work = quick_demo
    report = (work / "report.md").read_text()
    deployment = json.loads((work / "deployment.json").read_text())
    assert "## Deployment (ONNX Runtime)" in report
    assert set(deployment["models"]) == {"teacher", "half_kd", "slim_kd"}
    for name, model in deployment["models"].items():
        assert set(model["forms"]) == {"pytorch", "fp32", "int8"}
        assert model["raw_max_abs_diff"] < 1e-4, name  # the exported graph computes what the checkpoint does
        for form in model["forms"].values():
            assert all(median > 0 for median, _p90 in form["latency_ms"].values())
    # every ratio of the deployment table is in the demo report, with the value its run measured
    for label, check in deployment["checks"].items():
        assert f"| {label} | {check['speedup']:.2f}x |" in report
    # the students' retention as QUALITY.md measures it: its runs of the demo's recipe, over its teacher
    quality = json.loads((REPO / "quality.json").read_text())
    for student in ("half", "slim"):
        values = [run["mAP"] for run in quality["runs"]
                  if (run["student"], run["recipe"], run["targets"]) == (student, "heatmap=10,reg=1,init", "cache")]
        check = deployment["checks"][f"{student}_kd vs teacher, both ONNX Runtime fp32"]
        if not values:  # QUALITY.md has not trained this student under the demo's recipe (yet): no figure
            assert check["quality_retention"] is None
            continue
        expected = sum(values) / len(values) / quality["teacher"]["mAP"]
        assert check["quality_retention"] == pytest.approx(expected)
        assert f"| {expected:.3f} ({len(values)} seeds) |" in report


def test_quick_demo_writes_plots_and_loadable_students(quick_demo):
    work = quick_demo
    for name in ("loss_curves.png", "bev_features.png"):
        image = matplotlib.image.imread(work / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.01, f"{name} is blank"
    from featcache.teacher import models

    for run, config in (("student_half_kd", "configs/demo/student_half.py"),
                        ("student_slim_kd", "configs/demo/student_slim.py")):
        model = models.build_model(models.load_config(REPO / config), work / run / "student.pth")
        assert not any(name.startswith(("terms.", "heads.", "criteria.")) for name in model.state_dict())

