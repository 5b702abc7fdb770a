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


@pytest.mark.slow
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


@pytest.mark.slow
def test_quick_quality_rerun_reuses_completed_runs(quick_quality):
    command, out = quick_quality
    before = json.loads((out / "quality.json").read_text())
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads((out / "quality.json").read_text())
    assert after["runs"] == before["runs"]  # same records, none retrained
    assert "starting" not in result.stderr


def _quality_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_tool", REPO / "tools/quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_run_key_holds_the_codecs_of_the_layers_a_recipe_reads_only():
    quality = _quality_module()
    context = {"teacher_sha256": "t", "data_stamp": "d", "trainer_revision": "r",
               "cache_codecs": "pts_neck.0 int8-zstd3; reg fp16-zstd1; heatmap score8-zstd3",
               "codecs_by_kind": {"feature": "pts_neck.0 int8-zstd3", "reg": "task0.reg fp16-zstd1",
                                  "heatmap": "task0.heatmap score8-zstd3"}}
    other_heatmaps = {**context, "codecs_by_kind": {**context["codecs_by_kind"], "heatmap": "task0.heatmap fp16-zstd1"}}
    Run = quality.Run
    no_kd, init = Run("half", "no-kd", 0, "none"), Run("half", "init", 0, "none")
    pkd, heatmap = Run("half", "pkd=5", 0, "cache"), Run("half", "heatmap=10,reg=1,init", 0, "cache")
    online = Run("half", "heatmap=10,reg=1,init", 0, "online")
    assert quality.kinds_read(no_kd) == quality.kinds_read(init) == quality.kinds_read(online) == []
    assert quality.kinds_read(pkd) == ["feature"]
    assert quality.kinds_read(heatmap) == ["dim", "heatmap", "height", "reg", "rot", "vel"]
    for run in (no_kd, init, pkd, online):  # a heatmap codec change does not retrain what never reads heatmaps
        assert quality.run_key(run, context, False) == quality.run_key(run, other_heatmaps, False)
    assert quality.run_key(heatmap, context, False) != quality.run_key(heatmap, other_heatmaps, False)
    assert quality.run_key(heatmap, context, False) != quality.run_key(Run("half", "heatmap=10,reg=1,init", 1, "cache"),
                                                                       context, False)
    # records keyed before v2 (every layer's codecs) stay recognisable
    assert quality.legacy_run_key(pkd, context, False) != quality.run_key(pkd, context, False)


def test_heatmap_codec_arms_train_the_best_recipe_from_other_caches_and_reuse_same_key_records():
    quality = _quality_module()
    Run = quality.Run
    best = "heatmap=10,reg=1,init"
    records = [{"student": "half", "recipe": recipe, "targets": quality.targets_of(recipe), "seed": seed,
                "mAP": 0.6 + 0.1 * (recipe == best) + 0.01 * seed}
               for recipe in quality.CORE_RECIPES for seed in (0, 1, 2)]
    wanted = quality.wanted_runs(records, [0, 1, 2], False, None)
    arms = [run for run in wanted if quality.heatmap_codec_of(run.targets)]
    # every arm but the build's default heatmap codec, for the slim student's best recipe, every seed
    assert quality.heatmap_codec_arms(best) == ("score8-zstd3", "fp16-zstd1")
    assert arms == [Run("slim", best, seed, f"cache:{codec}") for codec in ("score8-zstd3", "fp16-zstd1")
                    for seed in (0, 1, 2)]
    assert quality.heatmap_codec_arms("pkd=5") == quality.heatmap_codec_arms("init") == ()
    assert len({run.name for run in wanted}) == len(set(wanted))  # each arm trains in its own work dir

    # the key holds where targets come from and the codecs read, not which cache: a run of the score8 arm is
    # the run a default cache of score8 heatmaps trained (its superseded record is taken, not retrained)
    score8 = {"teacher_sha256": "t", "data_stamp": "d", "trainer_revision": "r", "cache_codecs": "",
              "codecs_by_kind": {"heatmap": "task0.heatmap score8-zstd3", "reg": "task0.reg fp16-zstd1"}}
    asin8 = {**score8, "codecs_by_kind": {**score8["codecs_by_kind"], "heatmap": "task0.heatmap asin8-zstd3"}}
    arm, default = Run("slim", best, 0, "cache:score8-zstd3"), Run("slim", best, 0, "cache")
    assert quality.run_key(arm, score8, False) == quality.run_key(default, score8, False)
    assert quality.run_key(default, asin8, False) != quality.run_key(default, score8, False)
    assert quality.kinds_read(arm) == quality.kinds_read(default)

    # the report pairs each arm's seeds with the default cache's
    by_group = {("slim", best, "cache"): [{"seed": s, "mAP": 0.71 + 0.01 * s} for s in (0, 1, 2)],
                ("slim", best, "cache:score8-zstd3"): [{"seed": s, "mAP": 0.70 + 0.01 * s} for s in (0, 1, 2)]}
    lines = quality.heatmap_codec_section(by_group, best, {"asin8-zstd3": 0.48, "score8-zstd3": 0.24},
                                          {"heatmap_codec": "asin8-zstd3"})
    table = "\n".join(lines)
    assert "| `asin8-zstd3` (default) | 0.48 | 3 | 0.7200 ± 0.0100 |" in table
    assert "| `score8-zstd3` | 0.24 | 3 | 0.7100 ± 0.0100 | -0.0100 / -0.0100 / -0.0100 | -0.0100 |" in table
    assert "| `fp16-zstd1` |  | 0 | not run yet |" in table


def test_rekey_moves_records_only_where_the_proof_reproduces_them_bit_for_bit(monkeypatch):
    """A trainer change proven to leave results alone (the proof's runs, trained at the new revision, give the
    recorded mAPs exactly) re-keys every record, codec arms included; a proof that differs in the last bit, or
    lacks no-KD or an init run, or was trained at another revision, re-keys nothing."""
    import copy
    import math

    quality = _quality_module()
    Run = quality.Run
    context = {"teacher_sha256": "t", "data_stamp": "d", "trainer_revision": "old",
               "cache_codecs": "pts_neck.0 int8-zstd3; heatmap asin8-zstd3", "heatmap_codec": "asin8-zstd3",
               "codecs_by_kind": {"feature": "pts_neck.0 int8-zstd3", "heatmap": "task0.heatmap asin8-zstd3",
                                  "reg": "task0.reg fp16-zstd1"}}
    runs = [Run("half", "no-kd", 0, "none"), Run("half", "heatmap=10,reg=1,init", 0, "cache"),
            Run("slim", "heatmap=10,reg=1,init", 1, "cache:score8-zstd3"), Run("half", "pkd=5", 2, "cache")]
    state = {"runs": [{**quality.asdict(run), "mAP": 0.5 + run.seed / 10,
                       "key": quality.run_key(run, quality.arm_context(context, run), False)} for run in runs],
             "superseded_runs": [], "context": context,
             "teacher": {"mAP": 0.8, "key": quality.sha256(b"tdold")}}
    monkeypatch.setattr(quality, "trainer_revision", lambda: "new")
    new = {**context, "trainer_revision": "new"}
    proof = {"context": new, "runs": [{**record, "key": quality.run_key(quality.record_run(record), new, False)}
                                      for record in state["runs"][:2]]}
    last_bit = {**proof["runs"][1], "mAP": math.nextafter(proof["runs"][1]["mAP"], 1)}
    for broken in ({"runs": [proof["runs"][0]]}, {"context": context}, {"runs": [proof["runs"][0], last_bit]}):
        attempt = copy.deepcopy(state)
        with pytest.raises(SystemExit):
            quality.rekey(attempt, {**proof, **broken}, False)
        assert attempt == state
    message = quality.rekey(state, proof, False)
    assert "re-keyed 4 of 4 records from trainer old to new" in message
    for record in state["runs"]:
        run = quality.record_run(record)
        assert record["key"] == quality.run_key(run, quality.arm_context(new, run), False)
    assert state["teacher"]["key"] == quality.sha256(b"tdnew") and state["context"]["trainer_revision"] == "new"
    assert state["rekeyed"][0]["proof"][0].startswith("half/no-kd/")


def test_rekey_on_another_machine_compares_with_a_baseline_trained_here(monkeypatch):
    """Float results depend on the CPU's kernels: on another machine the proof must reproduce the same runs trained
    there at the records' revision (the baseline), not the records; a baseline of another revision is refused."""
    quality = _quality_module()
    Run = quality.Run
    context = {"teacher_sha256": "t", "data_stamp": "d", "trainer_revision": "old", "heatmap_codec": "asin8-zstd3",
               "codecs_by_kind": {"feature": "f", "heatmap": "h asin8-zstd3", "reg": "r"}}
    runs = [Run("half", "no-kd", 0, "none"), Run("half", "heatmap=10,reg=1,init", 0, "cache")]

    def records(revision: str, offset: float) -> list[dict]:
        ctx = {**context, "trainer_revision": revision}
        return [{**quality.asdict(run), "mAP": 0.6 + index / 10 + offset, "key": quality.run_key(run, ctx, False)}
                for index, run in enumerate(runs)]

    state = {"runs": records("old", 0.0), "superseded_runs": [], "context": context, "teacher": {"key": "x"}}
    monkeypatch.setattr(quality, "trainer_revision", lambda: "new")
    proof = {"context": {**context, "trainer_revision": "new"}, "runs": records("new", 1e-4)}
    with pytest.raises(SystemExit, match="not reproduced bit for bit"):
        quality.rekey(state, proof, False)
    with pytest.raises(SystemExit, match="was not trained at the records' trainer revision old"):
        quality.rekey(state, proof, False, {"runs": records("new", 1e-4)})
    message = quality.rekey(state, proof, False, {"runs": records("old", 1e-4)})
    assert "re-keyed 2 of 2 records" in message and "(baseline on this machine)" in state["rekeyed"][0]["proof"][0]
    assert [record["mAP"] for record in state["runs"]] == [0.6, 0.7]  # the records keep their own figures
