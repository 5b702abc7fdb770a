"""The quality benchmark (``trainer.quality``, ``tools/quality.py``): its quick run with two seeds and its resume,
run keys, codec arms, re-keying, and the committed QUALITY.md regenerated from the committed quality.json."""
from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from dataclasses import asdict

import pytest

from conftest import REPO
from trainer.quality import keys, plan, report
from trainer.quality.keys import arm_context, kinds_read, legacy_run_key, rekey, run_key, sha256
from trainer.quality.plan import STUDENTS, Run, record_run

RECORD_FIELDS = {"student", "recipe", "seed", "targets", "mAP", "AP", "params", "train_s", "step_s"}


@pytest.fixture(scope="module")
def quick_quality(tmp_path_factory):
    """Two seeds, so that the report compares each recipe with no-KD (a gap needs two values)."""
    out, work = tmp_path_factory.mktemp("quality_out"), tmp_path_factory.mktemp("quality_work")
    command = [sys.executable, "tools/quality.py", "--quick", "--seeds", "0", "1", "--out-dir", str(out),
               "--work-dir", str(work)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return command, out


@pytest.mark.slow
def test_quick_quality_writes_its_records_table_and_plot(quick_quality):
    _, out = quick_quality
    state = json.loads((out / "quality.json").read_text())
    assert 0 < state["teacher"]["mAP"] <= 1 and state["teacher"]["params"] > 0
    groups = {}
    for record in state["runs"]:
        assert RECORD_FIELDS <= set(record)
        assert 0.0 <= record["mAP"] <= 1.0 and set(record["AP"]) == {"car", "truck", "bicycle", "pedestrian",
                                                                       "barrier", "traffic_cone"}
        assert record["params"] < state["teacher"]["params"] and record["train_s"] > 0 and record["step_s"] > 0
        groups.setdefault((record["student"], record["recipe"], record["targets"]), {})[record["seed"]] = record["mAP"]
    assert {group: sorted(seeds) for group, seeds in groups.items()} == {("half", "no-kd", "none"): [0, 1],
                                                                        ("half", "pkd=5", "cache"): [0, 1]}
    text = (out / "QUALITY.md").read_text()
    rows = {(student, recipe, targets): next(line for line in text.splitlines()
                                             if line.startswith(f"| {student} | `{recipe}` | {targets} |"))
            for student, recipe, targets in groups}
    for group, by_seed in groups.items():
        mean, std = report.describe(list(by_seed.values()))
        assert f"| 2 | {mean:.4f} ± {std:.4f} | {min(by_seed.values()):.4f}..{max(by_seed.values()):.4f} | " \
               f"{mean / state['teacher']['mAP']:.3f} |" in rows[group]
    # the comparison with no-KD, from both seeds of each
    gain, gap = report.compare(list(groups[("half", "pkd=5", "cache")].values()),
                               list(groups[("half", "no-kd", "none")].values()))
    assert f"| {gain:+.4f} | {'' if gap is None else f'{gap:+.2f}'} |" in rows[("half", "pkd=5", "cache")]
    assert "gain over no-KD" in text and "QUICK" in text and "## Targets (issue #15)" in text
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


def test_committed_report_is_what_the_committed_records_render():
    """QUALITY.md is generated, never edited: rendering the committed quality.json (with the writer its header
    names: when, which machine, which versions) gives the committed QUALITY.md byte for byte."""
    committed = (REPO / "QUALITY.md").read_text()
    state = json.loads((REPO / "quality.json").read_text())
    writer = report.Writer(
        written=re.search(r"\(last written (.+?)\) from the runs", committed).group(1),
        machine=re.search(r"^- machine: (.+?) \(the machine that wrote this report", committed, re.M).group(1),
        versions=re.search(r"^- versions: (.+)$", committed, re.M).group(1))
    assert report.render_report(state, state["context"], False, writer) == committed


def test_paired_difference_is_scipys_paired_t_interval_over_the_seeds_both_trained():
    from scipy.stats import ttest_rel

    recipe = [{"seed": seed, "mAP": value} for seed, value in enumerate([0.781, 0.802, 0.766, 0.790, 0.771])]
    no_kd = [{"seed": seed, "mAP": value} for seed, value in enumerate([0.631, 0.647, 0.621, 0.640])][::-1]
    no_kd.append({"seed": 9, "mAP": 0.1})  # a seed the recipe did not train is not paired
    paired = report.paired_difference(recipe, no_kd)
    reference = ttest_rel([r["mAP"] for r in recipe[:4]], [0.631, 0.647, 0.621, 0.640]).confidence_interval(0.95)
    assert paired.seeds == 4
    assert paired.mean == pytest.approx(sum(r["mAP"] for r in recipe[:4]) / 4 - (0.631 + 0.647 + 0.621 + 0.640) / 4)
    assert (paired.low, paired.high) == (pytest.approx(reference.low), pytest.approx(reference.high))
    assert str(paired).endswith("(4)") and report.paired_difference(recipe[:1], no_kd) is None  # one seed: no interval


def test_run_key_changes_with_every_field_it_holds_and_only_with_them():
    """Two contexts (or runs) that differ in one field give different keys; equal ones give the same key."""
    context = {"teacher_sha256": "t", "data_stamp": "d", "trainer_revision": "r", "cache_codecs": "c",
               "codecs_by_kind": {"feature": "pts_neck.0 int8-zstd3"}, "cache": "/somewhere", "heatmap_codec": "h"}
    run = Run("half", "pkd=5", 0, "cache")
    key = run_key(run, context, False)
    assert run_key(Run("half", "pkd=5", 0, "cache"), copy.deepcopy(context), False) == key
    # where the cache lies and which arm it is are not what the run read
    assert run_key(run, {**context, "cache": "/elsewhere", "heatmap_codec": "x"}, False) == key
    changed = [{**context, "teacher_sha256": "t2"}, {**context, "data_stamp": "d2"},
               {**context, "trainer_revision": "r2"},
               {**context, "codecs_by_kind": {"feature": "pts_neck.0 fp16-zstd1"}}]
    assert len({key} | {run_key(run, other, False) for other in changed}) == 1 + len(changed)
    others = [Run("slim", "pkd=5", 0, "cache"), Run("half", "pkd=4", 0, "cache"), Run("half", "pkd=5", 1, "cache"),
              Run("half", "pkd=5", 0, "online")]
    quick = run_key(run, context, True)
    assert len({key, quick} | {run_key(other, context, False) for other in others}) == 2 + len(others)


def test_key_v3_holds_the_code_identity_and_no_absolute_path_and_v2_records_are_adopted_once(monkeypatch):
    """Key v3 changes with each code field (featcache, generator, teacher config, libraries); the configs it holds
    name no absolute path; the records of a context from before v3 take their v3 key once, when their v2 key
    matches under the current context."""
    v2 = {"teacher_sha256": "t", "data_stamp": "d", "trainer_revision": "r", "cache_codecs": "c",
          "codecs_by_kind": {"feature": "pts_neck.0 int8-zstd3"}}
    identity = {field: f"{field}-1" for field in keys.CODE_FIELDS}
    v3 = {**v2, **identity}
    run = Run("half", "pkd=5", 0, "cache")
    key = run_key(run, v3, False)
    assert key != run_key(run, v2, False)
    changed = {run_key(run, {**v3, field: "other"}, False) for field in keys.CODE_FIELDS}
    assert len(changed | {key}) == 1 + len(keys.CODE_FIELDS)
    assert str(REPO) not in keys.config_text(STUDENTS["half"]) and str(REPO) in keys.config_text(STUDENTS["half"], False)
    assert set(keys.code_identity()) == set(keys.CODE_FIELDS)

    runs = [Run("half", "no-kd", 0, "none"), run, Run("half", "pkd=5", 1, "cache")]
    state = {"runs": [{**asdict(r), "mAP": 0.6, "key": run_key(r, v2, False)} for r in runs], "context": v2,
             "teacher": {"key": keys.teacher_key(v2)}}
    state["runs"][2]["key"] = "stale"  # trained under something else: not adopted
    assert keys.adopt_v3(state, lambda r: v3, False) == 2
    assert [r["key"] for r in state["runs"]] == [run_key(runs[0], v3, False), key, "stale"]
    assert state["key_v3"]["records"] == 2 and state["teacher"]["key"] == keys.teacher_key(v3)
    state["context"] = v3
    assert keys.adopt_v3(state, lambda r: v3, False) == 0  # once: a v3 context adopts nothing

    # a re-key proof trained under another code identity than the checkout's is refused
    monkeypatch.setattr(keys, "trainer_revision", lambda: "r2")
    monkeypatch.setattr(keys, "code_identity", lambda: identity)
    proof = {"context": {**v3, "trainer_revision": "r2", "libraries": "torch 0"}, "runs": []}
    with pytest.raises(SystemExit, match="another libraries than this checkout's"):
        rekey(state, proof, False)


def test_run_key_holds_the_codecs_of_the_layers_a_recipe_reads_only():
    context = {"teacher_sha256": "t", "data_stamp": "d", "trainer_revision": "r",
               "cache_codecs": "pts_neck.0 int8-zstd3; reg fp16-zstd1; heatmap score8-zstd3",
               "codecs_by_kind": {"feature": "pts_neck.0 int8-zstd3", "reg": "task0.reg fp16-zstd1",
                                  "heatmap": "task0.heatmap score8-zstd3"}}
    other_heatmaps = {**context, "codecs_by_kind": {**context["codecs_by_kind"], "heatmap": "task0.heatmap fp16-zstd1"}}
    no_kd, init = Run("half", "no-kd", 0, "none"), Run("half", "init", 0, "none")
    pkd, heatmap = Run("half", "pkd=5", 0, "cache"), Run("half", "heatmap=10,reg=1,init", 0, "cache")
    online = Run("half", "heatmap=10,reg=1,init", 0, "online")
    assert kinds_read(no_kd) == kinds_read(init) == kinds_read(online) == []
    assert kinds_read(pkd) == ["feature"]
    assert kinds_read(heatmap) == ["dim", "heatmap", "height", "reg", "rot", "vel"]
    for run in (no_kd, init, pkd, online):  # a heatmap codec change does not retrain what never reads heatmaps
        assert run_key(run, context, False) == run_key(run, other_heatmaps, False)
    assert run_key(heatmap, context, False) != run_key(heatmap, other_heatmaps, False)
    assert run_key(heatmap, context, False) != run_key(Run("half", "heatmap=10,reg=1,init", 1, "cache"),
                                                                       context, False)
    # records keyed before v2 (every layer's codecs) stay recognisable
    assert legacy_run_key(pkd, context, False) != run_key(pkd, context, False)


def test_heatmap_codec_arms_train_the_best_recipe_from_other_caches_and_reuse_same_key_records():
    best = "heatmap=10,reg=1,init"
    records = [{"student": "half", "recipe": recipe, "targets": plan.targets_of(recipe), "seed": seed,
                "mAP": 0.6 + 0.1 * (recipe == best) + 0.01 * seed}
               for recipe in plan.CORE_RECIPES for seed in (0, 1, 2)]
    wanted = plan.wanted_runs(records, [0, 1, 2], False, None)
    arms = [run for run in wanted if plan.heatmap_codec_of(run.targets)]
    # every arm but the build's default heatmap codec, for the slim student's best recipe, every seed
    assert plan.heatmap_codec_arms(best) == ("score8-zstd3", "fp16-zstd1")
    assert arms == [Run("slim", best, seed, f"cache:{codec}") for codec in ("score8-zstd3", "fp16-zstd1")
                    for seed in (0, 1, 2)]
    assert plan.heatmap_codec_arms("pkd=5") == plan.heatmap_codec_arms("init") == ()
    assert len({run.name for run in wanted}) == len(set(wanted))  # each arm trains in its own work dir

    # the key holds where targets come from and the codecs read, not which cache: a run of the score8 arm is
    # the run a default cache of score8 heatmaps trained (its superseded record is taken, not retrained)
    score8 = {"teacher_sha256": "t", "data_stamp": "d", "trainer_revision": "r", "cache_codecs": "",
              "codecs_by_kind": {"heatmap": "task0.heatmap score8-zstd3", "reg": "task0.reg fp16-zstd1"}}
    asin8 = {**score8, "codecs_by_kind": {**score8["codecs_by_kind"], "heatmap": "task0.heatmap asin8-zstd3"}}
    arm, default = Run("slim", best, 0, "cache:score8-zstd3"), Run("slim", best, 0, "cache")
    assert run_key(arm, score8, False) == run_key(default, score8, False)
    assert run_key(default, asin8, False) != run_key(default, score8, False)
    assert kinds_read(arm) == kinds_read(default)

    # the report pairs each arm's seeds with the default cache's
    by_group = {("slim", best, "cache"): [{"seed": s, "mAP": 0.71 + 0.01 * s} for s in (0, 1, 2)],
                ("slim", best, "cache:score8-zstd3"): [{"seed": s, "mAP": 0.70 + 0.01 * s} for s in (0, 1, 2)]}
    lines = report.heatmap_codec_section(by_group, best, {"asin8-zstd3": 0.48, "score8-zstd3": 0.24},
                                          {"heatmap_codec": "asin8-zstd3"})
    table = "\n".join(lines)
    assert "| `asin8-zstd3` (default) | 0.48 | 3 | 0.7200 ± 0.0100 |" in table
    assert "| `score8-zstd3` | 0.24 | 3 | 0.7100 ± 0.0100 | -0.0100 / -0.0100 / -0.0100 | -0.0100 |" in table
    assert "| `fp16-zstd1` |  | 0 | not run yet |" in table


def test_rekey_moves_records_only_where_the_proof_reproduces_them_bit_for_bit(monkeypatch):
    """A trainer change proven to leave results alone (the proof's runs, trained at the new revision, give the
    recorded mAPs exactly) re-keys every record, codec arms included; a proof that differs in the last bit, or
    lacks no-KD or an init run, or was trained at another revision, re-keys nothing."""
    context = {"teacher_sha256": "t", "data_stamp": "d", "trainer_revision": "old",
               "cache_codecs": "pts_neck.0 int8-zstd3; heatmap asin8-zstd3", "heatmap_codec": "asin8-zstd3",
               "codecs_by_kind": {"feature": "pts_neck.0 int8-zstd3", "heatmap": "task0.heatmap asin8-zstd3",
                                  "reg": "task0.reg fp16-zstd1"}}
    runs = [Run("half", "no-kd", 0, "none"), Run("half", "heatmap=10,reg=1,init", 0, "cache"),
            Run("slim", "heatmap=10,reg=1,init", 1, "cache:score8-zstd3"), Run("half", "pkd=5", 2, "cache")]
    state = {"runs": [{**asdict(run), "mAP": 0.5 + run.seed / 10,
                       "key": run_key(run, arm_context(context, run), False)} for run in runs],
             "superseded_runs": [], "context": context,
             "teacher": {"mAP": 0.8, "key": sha256(b"tdold")}}
    monkeypatch.setattr(keys, "trainer_revision", lambda: "new")
    monkeypatch.setattr(keys, "code_identity", dict)  # these contexts are keyed v2: no code identity to compare
    new = {**context, "trainer_revision": "new"}
    proof = {"context": new, "runs": [{**record, "key": run_key(record_run(record), new, False)}
                                      for record in state["runs"][:2]]}
    last_bit = {**proof["runs"][1], "mAP": math.nextafter(proof["runs"][1]["mAP"], 1)}
    for broken in ({"runs": [proof["runs"][0]]}, {"context": context}, {"runs": [proof["runs"][0], last_bit]}):
        attempt = copy.deepcopy(state)
        with pytest.raises(SystemExit):
            rekey(attempt, {**proof, **broken}, False)
        assert attempt == state
    message = rekey(state, proof, False)
    assert "re-keyed 4 of 4 records from trainer old to new" in message
    for record in state["runs"]:
        run = record_run(record)
        assert record["key"] == run_key(run, arm_context(new, run), False)
    assert state["teacher"]["key"] == sha256(b"tdnew") and state["context"]["trainer_revision"] == "new"
    assert state["rekeyed"][0]["proof"][0].startswith("half/no-kd/")


def test_rekey_leaves_the_records_of_an_altered_term_to_retrain(monkeypatch):
    """A change that fixes one term (the heatmap term read CenterHead's in-place sigmoid scores): proven on runs
    without it, every record but those distilling that kind (from the cache or an online teacher) is re-keyed."""
    context = {"teacher_sha256": "t", "data_stamp": "d", "trainer_revision": "old", "heatmap_codec": "asin8-zstd3",
               "codecs_by_kind": {"feature": "f", "heatmap": "h asin8-zstd3", "reg": "r"}}
    runs = [Run("half", "no-kd", 0, "none"), Run("half", "init", 0, "none"), Run("half", "pkd=5", 0, "cache"),
            Run("half", "heatmap=10,reg=1,init", 0, "cache"), Run("half", "heatmap=10,reg=1,init", 0, "online"),
            Run("half", "reg=1,init", 0, "cache")]
    state = {"runs": [{**asdict(run), "mAP": 0.6, "key": run_key(run, context, False)} for run in runs],
             "superseded_runs": [], "context": context, "teacher": {"key": "x"}}
    monkeypatch.setattr(keys, "trainer_revision", lambda: "new")
    monkeypatch.setattr(keys, "code_identity", dict)  # these contexts are keyed v2: no code identity to compare
    new = {**context, "trainer_revision": "new"}
    proof = {"context": new, "runs": [{**record, "key": run_key(record_run(record), new, False)}
                                      for record in state["runs"][:2]]}
    message = rekey(state, proof, False, retrain_kinds=["heatmap"])
    assert "re-keyed 4 of 6 records" in message and "2 records distilling heatmap left to retrain" in message
    moved = [record_run(r).name for r in state["runs"] if r["key"] == run_key(record_run(r), new, False)]
    assert moved == ["half/no-kd/none/seed0", "half/init/none/seed0", "half/pkd=5/cache/seed0",
                     "half/reg=1+init/cache/seed0"]
    assert state["rekeyed"][0]["left_to_retrain"] == 2 and state["rekeyed"][0]["retrain_kinds"] == ["heatmap"]


def test_rekey_on_another_machine_compares_with_a_baseline_trained_here(monkeypatch):
    """Float results depend on the CPU's kernels: on another machine the proof must reproduce the same runs trained
    there at the records' revision (the baseline), not the records; a baseline of another revision is refused."""
    context = {"teacher_sha256": "t", "data_stamp": "d", "trainer_revision": "old", "heatmap_codec": "asin8-zstd3",
               "codecs_by_kind": {"feature": "f", "heatmap": "h asin8-zstd3", "reg": "r"}}
    runs = [Run("half", "no-kd", 0, "none"), Run("half", "heatmap=10,reg=1,init", 0, "cache")]

    def records(revision: str, offset: float) -> list[dict]:
        ctx = {**context, "trainer_revision": revision}
        return [{**asdict(run), "mAP": 0.6 + index / 10 + offset, "key": run_key(run, ctx, False)}
                for index, run in enumerate(runs)]

    state = {"runs": records("old", 0.0), "superseded_runs": [], "context": context, "teacher": {"key": "x"}}
    monkeypatch.setattr(keys, "trainer_revision", lambda: "new")
    monkeypatch.setattr(keys, "code_identity", dict)  # these contexts are keyed v2: no code identity to compare
    proof = {"context": {**context, "trainer_revision": "new"}, "runs": records("new", 1e-4)}
    with pytest.raises(SystemExit, match="not reproduced bit for bit"):
        rekey(state, proof, False)
    with pytest.raises(SystemExit, match="was not trained at the records' trainer revision old"):
        rekey(state, proof, False, {"runs": records("new", 1e-4)})
    message = rekey(state, proof, False, {"runs": records("old", 1e-4)})
    assert "re-keyed 2 of 2 records" in message and "(baseline on this machine)" in state["rekeyed"][0]["proof"][0]
    assert [record["mAP"] for record in state["runs"]] == [0.6, 0.7]  # the records keep their own figures


def test_quality_retention_is_the_recipes_mean_over_seeds_of_the_student_trained_from_that_config(tmp_path):
    """deploy_report's QUALITY.md column: mean mAP of the recipe's seeds / the teacher's, for the student whose
    config is the one given; from the cache for a recipe with terms, none for no-KD or the teacher's weights."""
    runs = [{"student": "half", "recipe": "pkd=5", "targets": "cache", "seed": seed, "mAP": 0.5 + 0.1 * seed}
            for seed in (0, 1)]
    runs += [{"student": "half", "recipe": "init", "targets": "none", "seed": 0, "mAP": 0.7},
             {"student": "half", "recipe": "pkd=5", "targets": "online", "seed": 0, "mAP": 0.1},
             {"student": "slim", "recipe": "pkd=5", "targets": "cache", "seed": 0, "mAP": 0.2}]
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"teacher": {"mAP": 0.8}, "runs": runs}))
    half, slim = str(plan.STUDENTS["half"]), str(plan.STUDENTS["slim"])
    other = str(REPO / "configs/demo/teacher_pillar.py")
    found = plan.quality_retention(str(path), "pkd=5", [half, slim, other])
    assert found == {half: (pytest.approx(0.55 / 0.8), 2), slim: (pytest.approx(0.2 / 0.8), 1)}
    assert plan.quality_retention(str(path), "init", [half]) == {half: (0.7 / 0.8, 1)}
    assert plan.quality_retention(str(path), None, [half]) == {}
    assert plan.quality_retention(str(tmp_path / "absent.json"), "pkd=5", [half]) == {}


def test_the_pilot_seed_that_chose_the_coarse_recipe_never_credits_it():
    records = [{"seed": seed, "mAP": 0.5} for seed in range(6)]
    assert [r["seed"] for r in report.crediting(records, "coarse", plan.COARSE_RECIPE)] == list(plan.COARSE_SEEDS)
    assert report.crediting(records, "coarse", plan.COARSE_PILOT[0]) == records  # a pilot recipe: its one seed
    assert report.crediting(records, "half", plan.COARSE_RECIPE) == records
    assert plan.COARSE_PILOT_SEED not in plan.COARSE_SEEDS and plan.COARSE_RECIPE in plan.COARSE_PILOT


def test_a_scarce_label_student_trains_the_full_splits_iterations_on_its_first_scans(tmp_path):
    import pickle

    from trainer.quality import runs

    infos = {"metainfo": {"version": "test"},
             "data_list": [{"token": f"t{index}", "lidar_points": {"lidar_path": f"s{index}.bin"},
                            "instances": [{"bbox_3d": [0.0] * 7, "bbox_label_3d": 0}]} for index in range(400)]}
    (tmp_path / "nuscenes_infos_train.pkl").write_bytes(pickle.dumps(infos))
    options = [f"train_dataloader.dataset.data_root={tmp_path}/"]
    config = str(STUDENTS["coarse"])
    full_iterations = 4 * 200  # the coarse student: 4 epochs of 400 scans, 2 per step
    for labelled in (10, 25, 50, 100):
        scarce = runs.scarce_options(config, options, labelled)
        epochs = int(scarce[1].rpartition("=")[2])
        assert scarce[0] == f"train_dataloader.dataset.indices={labelled}"
        assert scarce[2:] == [f"param_scheduler.1.T_max={epochs}", f"param_scheduler.1.end={epochs}",
                              f"default_hooks.checkpoint.interval={epochs}"]
        assert abs(epochs * math.ceil(labelled / 2) - full_iterations) <= math.ceil(labelled / 2) / 2
    with pytest.raises(ValueError, match="the train split holds 400"):
        runs.scarce_options(config, options, 400)
    rest = pickle.loads(open(runs.write_unlabelled_rest(config, options, 100, str(tmp_path)), "rb").read())
    assert [info["token"] for info in rest["data_list"]] == [f"t{index}" for index in range(100, 400)]
    assert all(info["unlabelled"] and info["instances"] == [] for info in rest["data_list"])
    # the labelled count joins the key of a scarce-label run only: full-data keys stay what they were
    context = {"teacher_sha256": "t", "data_stamp": "d", "trainer_revision": "r", "codecs_by_kind": {}}
    full = keys._key_text(Run("coarse", "no-kd", 0, "none"), context, False, "")
    assert "labelled" not in full and keys._key_text(Run("coarse@100", "no-kd", 0, "none"), context, False, "") == \
        full + "\0labelled=100"
    scarce = plan.wanted_runs([], [0], False, "scarce")
    assert [run.student for run in scarce[:5]] == ["coarse@10", "coarse@25", "coarse@50", "coarse@100", "coarse_long@50"]
    assert {run.student for run in scarce[5:]} == {"coarse@10"} and len(scarce) == 5 + 3 + 4 * 5
    assert plan.recipe_parts("heatmap=4:loss=focal,pkd=5,unlabelled") == ("heatmap=4:loss=focal,pkd=5", False)
    assert plan.recipe_parts("pkd=5,unlabelled:pseudo=0.3") == ("pkd=5", False)
    assert plan.pseudo_label_score("pkd=5,unlabelled:pseudo=0.3") == 0.3 and plan.pseudo_label_score("pkd=5,unlabelled") is None
    assert plan.uses_unlabelled("pkd=5,unlabelled:pseudo=0.3") and not plan.uses_unlabelled("pkd=5")
