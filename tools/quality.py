"""The quality benchmark: demo students trained under distillation recipes, several seeds each.

Does a student trained from the cache come out better than the same student without it? One run
per arm cannot say (the same demo twice gave the half student's KD-minus-no-KD gap as -0.024 and
+0.022 mAP), so every recipe is trained with several seeds on the demo benchmark (the generated
scenes of ``make demo``, the shipped demo teacher, the students' 4-epoch schedule) and scored
with the project's metric (nuScenes centre-distance mAP on the val split). Writes ``QUALITY.md``,
``quality.json`` and ``quality.png`` at the repository root; never edit them by hand.

Completed runs are reused: each record in ``quality.json`` carries the key it was trained under
(student config text, recipe, seed, targets, teacher checkpoint, data and trainer revision; see
``run_key``), so re-running the script trains only what is missing and the table grows across
sessions. Runs of an older trainer revision move to ``superseded_runs`` and are no longer shown.

Usage::

    python tools/quality.py [--jobs 2] [--seeds 0 1 2] [--max-runs N] [--only half]
    python tools/quality.py --report-only          # rewrite QUALITY.md from quality.json
    python tools/quality.py --quick --out-dir DIR  # tiny smoke run (tests)
    python tools/quality.py --recipes no-kd heatmap=10 --seeds 0 --out-dir DIR --work-dir DIR  # a pilot
    python tools/quality.py --recipes heatmap=10,reg=1,init --only slim --heatmap-codec fp16-zstd1 \
        --out-dir DIR   # a pilot: another heatmap codec (its own cache beside the default one)
    python tools/quality.py --reuse-records DIR/quality.json  # take a pilot's runs that are runs of the plan
    python tools/quality.py --rekey-proof DIR/quality.json  # a trainer change proven to leave results alone

The plan also trains the best recipe's slim student from caches whose heatmaps use other codecs
(``HEATMAP_CODEC_ARMS``, targets ``cache:<codec>``): the report's heatmap codec section.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

TEACHER_CONFIG = REPO / "configs/demo/teacher_pillar.py"
TEACHER_CKPT = REPO / "checkpoints/demo_teacher_pillar.pth"
STUDENTS = {"half": REPO / "configs/demo/student_half.py", "slim": REPO / "configs/demo/student_slim.py"}
NO_KD = "no-kd"
# The recipes of the half student. Weights: crd, infonce and pkd losses are O(1) at the start, mse
# depends on the teacher's feature scale; pkd=5 follows mmrazor's PKD configs (loss_weight 6);
# heatmap=10 is SparseKD's heatmap-KD weight range (7-15) for the same confidence-weighted MSE.
# "init": the student starts from the teacher's sliced weights (--init-from-teacher), alone or with terms.
INIT = "init"
# The comparisons the targets need, trained first: no-KD, the teacher's weights alone, and response KD
# from the cache (heatmaps + regression outputs at GT centres and teacher peaks), and with label KD (the
# teacher's confident boxes added to the GT), on top of them. The best of these then gets its slim
# student, its online-teacher twin and CRD on top; every other recipe (each term alone, combinations)
# comes after.
CORE_RECIPES = (NO_KD, INIT, "heatmap=10,reg=1,init", "heatmap=10,reg=1,label=1,init")
OTHER_RECIPES = ("heatmap=10,reg=1", "heatmap=10", "heatmap=10,infonce=1", "crd=1", "infonce=1", "mse=1", "pkd=5",
                 "infonce=1,pkd=5")
HALF_RECIPES = CORE_RECIPES + OTHER_RECIPES
# What decides the outcome of a run: every trainer module but the CLI, which only parses (a glob, so a
# new module - a loss term, the weight inheritance - joins the key the day it is added).
# every trainer module that shapes a result, sub-packages included (paths relative to trainer/); the
# command line and the package docstring do not
TRAINER_FILES = tuple(sorted(path.relative_to(REPO / "trainer").as_posix() for path in (REPO / "trainer").rglob("*.py")
                             if path.relative_to(REPO / "trainer").as_posix() not in ("__init__.py", "cli.py")))
# What the benchmark's cache holds: the distilled feature map, every head output (--kd heatmap, reg) and
# the teacher's boxes (--kd label, reg's teacher peaks).
CACHE_OUTPUTS = ["--layers", "pts_neck", "--head-outputs", "all", "--boxes"]
# What heatmaps need (issue #15): the best recipe's slim student is also trained from caches whose
# heatmaps use these codecs instead of the default (``head_layers.HEATMAP_CODEC``), same seeds, each cache built
# once beside the default one. The slim student with the teacher's weights: its paired seeds stay close
# enough to tell codecs apart, where from-scratch students diverge by +-0.02 a seed.
HEATMAP_CODEC_ARMS = ("score8-zstd3", "fp16-zstd1")
SCENE_ARGS = {"full": ["--train", "400", "--val", "100"], "quick": ["--train", "6", "--val", "3"]}


def recipe_parts(recipe: str) -> tuple[str | None, bool]:
    """(--kd spec or None for the detection loss alone, whether the student inherits the teacher's weights)."""
    parts = [part for part in recipe.split(",") if part and part != INIT]
    return (None if recipe == NO_KD or not parts else ",".join(parts)), INIT in recipe.split(",")


def targets_of(recipe: str) -> str:
    """Where a recipe's targets come from when trained from the benchmark's cache: "none" without a term."""
    return "cache" if recipe_parts(recipe)[0] else "none"


def heatmap_codec_of(targets: str) -> str | None:
    """``"cache:fp16-zstd1"`` (a cache whose heatmaps are stored in that codec) -> ``"fp16-zstd1"``; None for
    the default cache, an online teacher or no targets."""
    return targets.partition(":")[2] or None


def target_source(targets: str) -> str:
    """"cache" | "online" | "none": where targets come from, whichever codecs the cache used (those are in
    the run key apart, ``codecs_read``)."""
    return targets.partition(":")[0]


@dataclass(frozen=True)
class Run:
    student: str  # "half" | "slim"
    recipe: str  # "no-kd" or a --kd spec
    seed: int
    targets: str  # "cache" | "cache:<heatmap codec>" | "online" | "none"

    @property
    def name(self) -> str:
        return f"{self.student}/{self.recipe.replace(',', '+')}/{self.targets.replace(':', '-')}/seed{self.seed}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def trainer_revision() -> str:
    digest = hashlib.sha256()
    for name in TRAINER_FILES:
        digest.update(name.encode() + b"\0" + (REPO / "trainer" / name).read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)  # every run key holds it: parse each student config once per process
def config_text(path: Path) -> str:
    from featcache.teacher import models

    return models.load_config(str(path)).text


def run_key(run: Run, context: dict[str, Any], quick: bool) -> str:
    """What a run's result depends on: config (with its bases), recipe, seed, targets, teacher
    checkpoint, data stamp, trainer revision, size, and the codecs of the cached layers the recipe's
    terms read (what their targets were stored as; ``codecs_read``): a heatmap codec change retrains
    the recipes distilling heatmaps, not no-KD or the feature terms. The key holds the targets' source, not
    which cache: a run from a ``cache:score8-zstd3`` arm is the same run as one from a default cache that
    stored score8 heatmaps."""
    return sha256(("v2\0" + _key_text(run, context, quick, codecs_read(run, context["codecs_by_kind"]))).encode())[:24]


def legacy_run_key(run: Run, context: dict[str, Any], quick: bool) -> str:
    """The key of records written before ``run_key`` v2, which held every layer's codecs
    (``cache_codecs``): such a record that matches it under the current context is current and is re-keyed."""
    return sha256(_key_text(run, context, quick, context["cache_codecs"]).encode())[:24]


def _key_text(run: Run, context: dict[str, Any], quick: bool, codecs: str) -> str:
    return "\0".join([config_text(STUDENTS[run.student]), run.recipe, str(run.seed), target_source(run.targets),
                      context["teacher_sha256"], context["data_stamp"], context["trainer_revision"], codecs,
                      "quick" if quick else "full"])


def kinds_read(run: Run) -> list[str]:
    """The kinds of cached layers a run's terms distil (``KDTerm.kinds``: "feature", "heatmap", "reg", ...);
    none for a run without terms or with an online teacher, which reads no cached target."""
    kd, _ = recipe_parts(run.recipe)
    if kd is None or target_source(run.targets) != "cache":
        return []
    from trainer.terms import TERMS, parse_kd_spec

    return sorted({kind for name in parse_kd_spec(kd) for kind in TERMS[name].kinds})


def codecs_read(run: Run, codecs_by_kind: dict[str, str]) -> str:
    """``'feature: pts_neck.0 int8-zstd3; heatmap: ...'`` for the kinds ``run`` reads ('' for none)."""
    return "; ".join(f"{kind}: {codecs_by_kind[kind]}" for kind in kinds_read(run) if kind in codecs_by_kind)


# -- one run (in a subprocess) ------------------------------------------------------------------

def data_options(data: Path) -> list[str]:
    return [f"train_dataloader.dataset.data_root={data}/", f"test_dataloader.dataset.data_root={data}/"]


def schedule_options(quick: bool) -> list[str]:
    """The quick size trains one epoch (the demo's --quick schedule)."""
    if not quick:
        return []
    return ["train_cfg.max_epochs=1", "param_scheduler.1.T_max=1", "param_scheduler.1.end=1",
            "default_hooks.logger.interval=1"] + eval_options(quick)


def eval_options(quick: bool) -> list[str]:
    # one-epoch students score near the 0.1 threshold everywhere: cap the boxes NMS sees per task
    return ["model.test_cfg.pts.pre_max_size=100", "model.test_cfg.pts.post_max_size=50"] if quick else []


def train_and_evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one student and score it: the record quality.json keeps (run in its own process)."""
    import torch

    from featcache.teacher.models import parse_cfg_options
    from trainer.evaluation import evaluate_checkpoint
    from trainer.terms import parse_kd_spec
    from trainer.train import TrainOptions, train

    run = Run(**spec["run"])
    work_dir = spec["work_dir"]
    options = parse_cfg_options(spec["cfg_options"] + [f"randomness.seed={run.seed}"])
    config = str(STUDENTS[run.student])
    kd, inherit = recipe_parts(run.recipe)
    common = dict(student_config=config, work_dir=work_dir, cfg_options=options,
                  init_from_teacher=(str(TEACHER_CONFIG), str(TEACHER_CKPT)) if inherit else None)
    if kd is None:
        train_options = TrainOptions(cache=None, no_distill=True, **common)
    elif run.targets == "online":
        train_options = TrainOptions(cache=None, kd=parse_kd_spec(kd), online_teacher=(
            str(TEACHER_CONFIG), str(TEACHER_CKPT)), teacher_cfg_options=parse_cfg_options(spec["cfg_options"]),
            **common)
    else:
        train_options = TrainOptions(cache=spec["cache"], kd=parse_kd_spec(kd), **common)
    start = time.perf_counter()
    train(train_options)
    train_s = time.perf_counter() - start
    evaluation = evaluate_checkpoint(config, os.path.join(work_dir, "student.pth"),
                                     parse_cfg_options(spec["cfg_options"]))
    metrics = evaluation.metrics
    return {**asdict(run), "key": spec["key"], "mAP": metrics["mAP"],
            "AP": finite_or_none({name[3:]: value for name, value in metrics.items() if name.startswith("AP_")}),
            "params": evaluation.num_parameters, "train_s": round(train_s, 1), "step_s": median_step_time(work_dir),
            "torch_threads": torch.get_num_threads(), "finished": now()}


def median_step_time(work_dir: str) -> float | None:
    """Median logged iteration time (s) of the run, the first logging window (warm-up) left out."""
    files = sorted(glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json")))
    if not files:
        return None
    with open(files[-1]) as stream:
        times = [json.loads(line)["time"] for line in stream if '"time"' in line]
    return round(statistics.median(times[1:] if len(times) > 1 else times), 4) if times else None


def finite_or_none(values: dict[str, float]) -> dict[str, float | None]:
    """AP per class with NaN (a class absent from the val split) as None: quality.json stays strict JSON."""
    return {name: (None if value != value else value) for name, value in values.items()}


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


# -- orchestration ------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def featcache_cli() -> list[str]:
    return [sys.executable, "-m", "trainer.cli"]


def prepare(work: Path, data: Path, quick: bool, heatmap_codec: str | None = None) -> dict[str, Any]:
    """Scenes, teacher cache (its heatmaps in ``heatmap_codec``, default ``head_layers.HEATMAP_CODEC``); returns
    the context every run key includes."""
    subprocess.run([sys.executable, str(REPO / "tools/generate_scenes.py"), "--out", str(data),
                    *SCENE_ARGS["quick" if quick else "full"], "--seed", "0", "--range", "40"],
                   check=True, stdout=subprocess.DEVNULL)
    stamp_text = (data / "featcache_synth_stamp.json").read_text()  # generator, seed and split sizes
    from featcache import format

    return {"teacher_sha256": format.sha256_file(str(TEACHER_CKPT)), "data_stamp": sha256(stamp_text.encode())[:16],
            "trainer_revision": trainer_revision(), **build_cache(work, data, heatmap_codec)}


def build_cache(work: Path, data: Path, heatmap_codec: str | None) -> dict[str, Any]:
    """Build (or complete) the teacher cache with heatmaps in ``heatmap_codec`` (None: the build's default);
    returns its part of the context: where it is and its codecs."""
    from featcache import head_layers
    from featcache.reader import open_cache

    # named by the head outputs' codecs and where regression outputs are kept ("centres": the build's default,
    # the cells the reg term reads; identical targets there): a cache of older defaults or of another arm stays
    # beside it (a build refuses to resume a cache built differently)
    heatmaps = heatmap_codec or head_layers.HEATMAP_CODEC.name
    cache = work / f"cache_neck_heads_boxes_{heatmaps}_{head_layers.HEAD_OUTPUT_CODEC.name}_centres"
    options = [item for option in data_options(data) for item in ("--cfg-options", option)]
    if heatmap_codec:
        options += ["--codec", f"heatmap={heatmap_codec}"]
    subprocess.run(featcache_cli() + ["build", str(TEACHER_CONFIG), str(TEACHER_CKPT), "--out", str(cache),
                                      *CACHE_OUTPUTS, *options], check=True)
    reader = open_cache(str(cache))
    return {"cache_codecs": cache_codecs(reader), "codecs_by_kind": codecs_by_kind(reader), "cache": str(cache),
            "heatmap_codec": heatmaps, "heatmap_bytes_per_value": heatmap_bytes_per_value(cache, reader)}


def heatmap_bytes_per_value(path: Path, cache: Any) -> float:
    """Stored (compressed) bytes per heatmap value over the cache's samples (``store.chunk_nbytes``)."""
    from featcache import format, store

    group = store.open_group(str(path))
    layers = [layer for layer in cache.manifest.layers if layer.kind == "heatmap"]
    stored = sum(store.chunk_nbytes(group[format.feature_path(layer.name)], row) or 0
                 for layer in layers for row in range(len(cache)))
    values = sum(math.prod(layer.shape) for layer in layers) * len(cache)
    return stored / values if values else float("nan")


def cache_codecs(cache: Any) -> str:
    """The codecs a cache stores its layers with, grouped (``pts_neck.0 int8-zstd3; heatmap asin8-zstd3; ...``):
    the report's codecs line, and the codecs part of ``legacy_run_key`` (keep its string as it is)."""
    groups: dict[str, set[str]] = {}
    for layer in cache.manifest.layers:
        kind = layer.kind if layer.is_head_output else layer.name  # features by name: the legacy key's string
        groups.setdefault(kind, set()).add(layer.codec.name)
    return "; ".join(f"{kind} {'/'.join(sorted(names))}" for kind, names in groups.items())


def codecs_by_kind(cache: Any) -> dict[str, str]:
    """Layer kind ("feature" for hooked features, a head output's kind) -> its layers' codecs
    (``'pts_neck.0 int8-zstd3'``); ``run_key`` takes those of the kinds a recipe reads."""
    kinds: dict[str, list[str]] = {}
    for layer in cache.manifest.layers:
        kinds.setdefault(layer.kind, []).append(f"{layer.name} {layer.codec.name}")
    return {kind: ", ".join(sorted(entries)) for kind, entries in kinds.items()}


def evaluate_teacher(data: Path, quick: bool) -> dict[str, Any]:
    from featcache.teacher.models import parse_cfg_options
    from trainer.evaluation import evaluate_checkpoint

    evaluation = evaluate_checkpoint(str(TEACHER_CONFIG), str(TEACHER_CKPT),
                                     parse_cfg_options(data_options(data) + eval_options(quick)))
    return {"mAP": evaluation.metrics["mAP"], "params": evaluation.num_parameters,
            "AP": finite_or_none({name[3:]: value for name, value in evaluation.metrics.items()
                                  if name.startswith("AP_")})}


def wanted_runs(records: list[dict], seeds: list[int], quick: bool, only: str | None,
                recipes: list[str] | None = None) -> list[Run]:
    """In order: the half student's core recipes seed by seed (every recipe's first seed before any
    recipe's second); once they are done, the best of them (``best_recipe``) for the slim student
    beside its no-KD twin, its online-teacher twin (one seed) and the half student with CRD on top of
    it; then the other half recipes, seed by seed. ``recipes`` (a pilot) trains those recipes only, of the
    half student (``only="slim"``: of the slim one)."""
    if recipes:
        student = "slim" if only == "slim" else "half"
        return [Run(student, recipe, seed, targets_of(recipe)) for seed in seeds for recipe in recipes]
    if quick:
        return [Run("half", recipe, seed, targets_of(recipe)) for seed in seeds for recipe in (NO_KD, "pkd=5")]
    runs: list[Run] = []
    if only in (None, "half"):
        runs += [Run("half", recipe, seed, targets_of(recipe)) for seed in seeds for recipe in CORE_RECIPES]
    best = best_recipe(records, "half", len(seeds))
    if best is not None:
        if only in (None, "slim"):
            runs += [run for seed in seeds for run in (Run("slim", NO_KD, seed, "none"),
                                                       Run("slim", best, seed, targets_of(best)))]
            runs += [Run("slim", best, seed, f"cache:{codec}") for codec in heatmap_codec_arms(best)
                     for seed in seeds]
        if only in (None, "online") and targets_of(best) == "cache":  # a recipe with teacher targets
            runs.append(Run("half", best, seeds[0], "online"))
        if only in (None, "half"):
            runs += [Run("half", with_crd(best), seed, "cache") for seed in seeds]
    if only in (None, "half"):
        runs += [Run("half", recipe, seed, targets_of(recipe)) for seed in seeds for recipe in OTHER_RECIPES]
    return runs


def heatmap_codec_arms(recipe: str) -> tuple[str, ...]:
    """``HEATMAP_CODEC_ARMS`` but the default, for a recipe that distils heatmaps (none for one that does not)."""
    from featcache import head_layers

    if "heatmap" not in kinds_read(Run("slim", recipe, 0, targets_of(recipe))):
        return ()
    return tuple(codec for codec in HEATMAP_CODEC_ARMS if codec != head_layers.HEATMAP_CODEC.name)


def with_crd(recipe: str) -> str:
    """The recipe with CRD (the method the project was first asked for) added on top."""
    return "crd=1" if recipe == NO_KD else f"{recipe},crd=1"


def best_recipe(records: list[dict], student: str, seeds: int = 3) -> str | None:
    """The core recipe (``CORE_RECIPES`` but no-KD) with the highest mean mAP, once every core recipe
    has all ``seeds`` runs (before that, a recipe with more seeds would win by arriving first); else None."""
    groups = group_records(records)
    candidates = [recipe for recipe in CORE_RECIPES if recipe != NO_KD]
    done = {recipe: len(groups.get((student, recipe, targets_of(recipe)), [])) for recipe in candidates}
    if min(done.values()) < seeds or len(groups.get((student, NO_KD, "none"), [])) < seeds:
        return None
    return max(candidates, key=lambda recipe: statistics.mean(groups[(student, recipe, targets_of(recipe))]))


def group_records(records: list[dict]) -> dict[tuple[str, str, str], list[float]]:
    groups: dict[tuple[str, str, str], list[float]] = {}
    for record in sorted(records, key=lambda r: r["seed"]):
        groups.setdefault((record["student"], record["recipe"], record["targets"]), []).append(record["mAP"])
    return groups


def record_run(record: dict[str, Any]) -> Run:
    return Run(**{field: record[field] for field in ("student", "recipe", "seed", "targets")})


def load(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"teacher": None, "runs": [], "superseded_runs": []}


def save(path: Path, state: dict[str, Any]) -> None:
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(state, indent=1, allow_nan=False) + "\n")
    os.replace(partial, path)


def run_one(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Train + evaluate in a fresh process (its own torch threads and generator state)."""
    os.makedirs(spec["work_dir"], exist_ok=True)
    spec_path = os.path.join(spec["work_dir"], "spec.json")
    with open(spec_path, "w") as stream:
        json.dump(spec, stream)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_path = os.path.join(spec["work_dir"], "run.log")
    with open(log_path, "w") as stream:
        result = subprocess.run([sys.executable, __file__, "--run-spec", spec_path], stdout=stream,
                                stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        with open(log_path) as stream:
            tail = stream.read()[-2000:]
        raise RuntimeError(f"run {spec['run']} failed (exit {result.returncode}); log {log_path}:\n{tail}")
    with open(os.path.join(spec["work_dir"], "record.json")) as stream:
        return json.load(stream)


def execute(args: argparse.Namespace) -> None:
    out_dir = Path(args.out_dir)
    state_path = out_dir / "quality.json"
    state = load(state_path)
    work = Path(args.work_dir)
    data = work / "data" if args.quick else REPO / "data/generated/demo"
    context = prepare(work, data, args.quick, args.heatmap_codec)
    log(f"trainer revision {context['trainer_revision']}, cache {context['cache']}")
    contexts = {None: context}
    state["heatmap_caches"] = {context["heatmap_codec"]: context["heatmap_bytes_per_value"]}

    def context_of(run: Run) -> dict[str, Any]:
        """The context of the cache ``run`` reads: the default one, or a heatmap-codec arm's (built once)."""
        codec = heatmap_codec_of(run.targets)
        if codec not in contexts:
            log(f"cache with {codec} heatmaps (a codec arm)")
            contexts[codec] = {**context, **build_cache(work, data, codec)}
            state["heatmap_caches"] = {c["heatmap_codec"]: c["heatmap_bytes_per_value"] for c in contexts.values()}
        return contexts[codec]

    keys = {record_run(r): r for r in state["runs"]}
    current = {}
    for run, record in keys.items():
        key = run_key(run, context_of(run), args.quick)
        if record["key"] == legacy_run_key(run, context_of(run), args.quick):
            record["key"] = key
        if record["key"] == key:
            current[run] = record
        else:
            state["superseded_runs"].append(record)
    state["runs"] = list(current.values())
    # a run of the plan that some record already trained under the same key is taken, not retrained: a
    # superseded record of a run that is current again (a codec arm that was the default), a pilot's
    # (--reuse-records)
    known = {record["key"]: record for record in state["superseded_runs"]}
    for path in args.reuse_records or ():
        known.update({record["key"]: record for record in load(Path(path))["runs"]})
    state["context"] = {key: value for key, value in context.items() if key != "cache"}
    teacher_key = sha256((context["teacher_sha256"] + context["data_stamp"] + context["trainer_revision"]).encode())
    if not state.get("teacher") or state["teacher"].get("key") != teacher_key:
        log("evaluating the teacher")
        state["teacher"] = {**evaluate_teacher(data, args.quick), "key": teacher_key}
    save(state_path, state)
    budget = args.max_runs
    while True:
        todo = [run for run in wanted_runs(state["runs"], args.seeds, args.quick, args.only, args.recipes)
                if run not in current]
        todo = list(dict.fromkeys(todo))
        for run in todo:
            record = known.pop(run_key(run, context_of(run), args.quick), None)
            if record is not None:
                if record in state["superseded_runs"]:
                    state["superseded_runs"].remove(record)
                log(f"reused {run.name}: trained as {record_run(record).name} under the same key, mAP {record['mAP']:.4f}")
                current[run] = {**record, **asdict(run)}
        if len(current) > len(state["runs"]):
            state["runs"] = list(current.values())
            save(state_path, state)
            continue
        if budget is not None:
            todo = todo[:max(budget, 0)]
        if not todo:
            break
        batch = todo[:args.jobs]
        log(f"{len(todo)} runs to do; starting {', '.join(run.name for run in batch)}")
        specs = []
        for run in batch:
            key = run_key(run, context_of(run), args.quick)
            specs.append({"run": asdict(run), "key": key, "work_dir": str(work / "runs" / run.name),
                          "cache": context_of(run)["cache"],
                          "cfg_options": data_options(data) + schedule_options(args.quick)})
        # by --jobs, not by this batch's size: a last run alone would get every core, and a run's result
        # depends on its thread count (reduction order), which its key does not hold
        threads = max(1, (os.cpu_count() or 2) // args.jobs)
        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            futures = {pool.submit(run_one, spec, threads): spec for spec in specs}
            for future in concurrent.futures.as_completed(futures):
                record = future.result()
                run = record_run(record)
                current[run] = record
                state["runs"] = list(current.values())
                save(state_path, state)
                write_report(out_dir, state, context, args.quick)
                log(f"done {run.name}: mAP {record['mAP']:.4f} ({record['train_s']:.0f} s)")
        if budget is not None:
            budget -= len(batch)
    write_report(out_dir, state, context, args.quick)


def arm_context(context: dict[str, Any], run: Run) -> dict[str, Any]:
    """The context of the cache ``run`` read, derived from the default cache's without building the arm's: a
    heatmap-codec arm's cache differs from the default one only in its heatmaps' codec (``build_cache``)."""
    codec = heatmap_codec_of(run.targets)
    if codec is None:
        return context
    kinds = dict(context["codecs_by_kind"])
    kinds["heatmap"] = kinds["heatmap"].replace(context["heatmap_codec"], codec)
    return {**context, "codecs_by_kind": kinds}


def rekey(state: dict[str, Any], proof: dict[str, Any], quick: bool, baseline: dict[str, Any] | None = None) -> str:
    """Move the records of ``state``'s trainer revision to the current one, where ``proof`` (the quality.json of
    runs trained at the current revision, e.g. ``--recipes no-kd heatmap=10,reg=1,init --seeds 0 --only half``)
    reproduces the recorded mAP of every one of its runs bit for bit: a trainer change that leaves results alone
    need not retrain the plan. On another machine than the records' (float results depend on the CPU's kernels),
    ``baseline`` holds the same runs trained there at the records' revision, and the proof must reproduce those.
    Every current record whose key is its run's key under the old revision (checked, not assumed) is re-keyed;
    the proof is kept in ``state["rekeyed"]``. Refuses (SystemExit) otherwise."""
    old_context = state["context"]
    new_context = {**old_context, "trainer_revision": trainer_revision()}
    if proof["context"]["trainer_revision"] != new_context["trainer_revision"]:
        raise SystemExit(f"the proof was trained at trainer revision {proof['context']['trainer_revision']}, the "
                         f"trainer now is {new_context['trainer_revision']}: train the proof again")
    records = {record_run(record): record for record in state["runs"]}
    if baseline is not None:
        records = {}
        for record in baseline["runs"]:
            run = record_run(record)
            if record["key"] != run_key(run, arm_context(old_context, run), quick):
                raise SystemExit(f"baseline run {run.name} was not trained at the records' trainer revision "
                                 f"{old_context['trainer_revision']} under this benchmark's context")
            records[run] = record
    proven = []
    for record in proof["runs"]:
        run = record_run(record)
        if record["key"] != run_key(run, arm_context(new_context, run), quick):
            raise SystemExit(f"proof run {run.name} was not trained under this benchmark's context (teacher, data, "
                             "codecs) at the current trainer revision")
        base = records.get(run)
        if base is None or base["mAP"] != record["mAP"]:
            raise SystemExit(f"proof run {run.name}: mAP {record['mAP']!r} at trainer {new_context['trainer_revision']}, "
                             f"{None if base is None else base['mAP']!r} recorded: not reproduced bit for bit; retrain")
        proven.append(f"{run.name} {record['mAP']!r}" + ("" if baseline is None else " (baseline on this machine)"))
    if not any(name.startswith(f"half/{NO_KD}/") for name in proven) or not any("init" in name for name in proven):
        raise SystemExit("the proof must hold a no-KD run and an init recipe run of the half student")
    moved = 0
    records = {record_run(record): record for record in state["runs"]}
    for run, record in records.items():
        if record["key"] == run_key(run, arm_context(old_context, run), quick):
            record["key"] = run_key(run, arm_context(new_context, run), quick)
            moved += 1
    teacher_key = sha256((new_context["teacher_sha256"] + new_context["data_stamp"]
                          + new_context["trainer_revision"]).encode())
    if state["teacher"].get("key") == sha256((old_context["teacher_sha256"] + old_context["data_stamp"]
                                              + old_context["trainer_revision"]).encode()):
        state["teacher"]["key"] = teacher_key
    state["context"] = new_context
    state.setdefault("rekeyed", []).append({"from": old_context["trainer_revision"], "to": new_context["trainer_revision"],
                                            "proof": proven, "records": moved, "at": now()})
    return (f"re-keyed {moved} of {len(records)} records from trainer {old_context['trainer_revision']} to "
            f"{new_context['trainer_revision']} (reproduced: {'; '.join(proven)})")


# -- report -------------------------------------------------------------------------------------

def describe(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def compare(values: list[float], base: list[float]) -> tuple[float, float | None]:
    """(mean of ``values`` - mean of ``base``, that difference / the larger of the two stds); the gap is
    None when that std is not a positive number (one seed, or identical seeds)."""
    (mean, std), (base_mean, base_std) = describe(values), describe(base)
    larger = max(std, base_std)
    return mean - base_mean, (mean - base_mean) / larger if larger == larger and larger > 0 else None  # NaN-safe


def write_report(out_dir: Path, state: dict[str, Any], context: dict[str, Any], quick: bool) -> None:
    teacher = state["teacher"]
    groups = group_records(state["runs"])
    records_by_group: dict[tuple[str, str, str], list[dict]] = {}
    for record in state["runs"]:
        records_by_group.setdefault((record["student"], record["recipe"], record["targets"]), []).append(record)
    plot(out_dir / "quality.png", groups, teacher["mAP"])
    from featcache.teacher.build import library_versions

    versions = {**library_versions(), "python": platform.python_version()}
    lines = ["# featcache quality benchmark", "",
             f"Generated by `python tools/quality.py{' --quick' if quick else ''}` (last written {now()}) from the "
             f"runs in `quality.json`; every figure is measured by the runs listed there. Do not edit by hand.", "",
             f"- machine: {len(os.sched_getaffinity(0))} cores, {platform.processor() or platform.machine()}, "
             f"Linux {platform.release()} (the machine that wrote this report; the runs' own may differ, see the "
             "re-keying lines); two trainings side by side at one torch thread each",
             "- versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
             *(f"- re-keyed from trainer revision {entry['from']} to {entry['to']} ({entry['at']}, {entry['records']} "
               f"records, none retrained): these runs trained again at both revisions on the re-keying machine gave "
               f"the same mAP bit for bit: {'; '.join(entry['proof'])}" for entry in state.get("rekeyed", [])),
             f"- trainer revision {context['trainer_revision']} (sha256 of trainer/{{{','.join(TRAINER_FILES)}}}); "
             f"teacher checkpoint sha256 {context['teacher_sha256'][:12]}; scenes stamp {context['data_stamp']}",
             f"- benchmark: the demo's generated scenes ({'6 train / 3 val' if quick else '400 train / 100 val'} "
             "ray-cast scans), the shipped demo teacher "
             "(`configs/demo/teacher_pillar.py`), its `pts_neck` map, every CenterHead output and its decoded boxes "
             "(`--boxes`: label KD, reg's teacher peaks) cached once "
             f"(codecs: {context.get('cache_codecs', 'not recorded')}), students trained "
             f"{1 if quick else 4} epoch(s) (the demo schedule) with `featcache train --kd RECIPE --cfg-options randomness.seed=SEED`; "
             "mAP = nuScenes centre-distance AP over 0.5/1/2/4 m on the val split (`trainer/evaluation.py`)"
             + (" — QUICK smoke-test sizes, not representative" if quick else ""), "",
             f"Teacher: mAP **{teacher['mAP']:.4f}**, {teacher['params']:,} parameters.", ""]
    header = ["student", "recipe", "targets", "seeds", "mAP mean ± std", "min..max", "retention", "gain over no-KD",
              "gap / larger std", "params", "step s", "train s"]
    rows = []
    verdicts = []
    for (student, recipe, targets), values in sorted(groups.items(), key=lambda item: (item[0][0], item[0][2],
                                                                                        item[0][1] != NO_KD, item[0][1])):
        mean, std = describe(values)
        base = groups.get((student, NO_KD, "none"))
        gain = gap = None
        if base and recipe != NO_KD:
            gain, gap = compare(values, base)
            # a codec arm is judged against the default cache's runs (its section), not drawn as a recipe
            if gap is not None and len(values) >= 3 and len(base) >= 3 and not heatmap_codec_of(targets):
                verdicts.append((student, recipe, targets, gain, gap))
        records = records_by_group[(student, recipe, targets)]
        step = [r["step_s"] for r in records if r.get("step_s")]
        rows.append([student, f"`{recipe}`", targets, str(len(values)),
                     f"{mean:.4f} ± {std:.4f}" if std == std else f"{mean:.4f}",
                     f"{min(values):.4f}..{max(values):.4f}", f"{mean / teacher['mAP']:.3f}",
                     "" if gain is None else f"{gain:+.4f}", "" if gap is None else f"{gap:+.2f}",
                     f"{records[0]['params']:,}", f"{statistics.median(step):.3f}" if step else "",
                     f"{statistics.median(r['train_s'] for r in records):.0f}"])
    lines += ["## mAP per recipe", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Gap = (recipe mean - no-KD mean) / the larger of the two standard deviations. Step s: median "
              "logged iteration time at one torch thread with another training beside it, and possibly other jobs "
              "(tests) on the machine: a record of the run, not a speed figure (BENCHMARKS.md figure 7 times the "
              "terms side by side).", "",
              "![mAP per recipe, one dot per seed](quality.png)", "", "## What the runs say", ""]
    best = best_recipe(state["runs"], "half")
    lines += conclusions(groups, verdicts, best)
    lines += ["", "## Targets (issue #15)", ""] + target_table(groups, teacher["mAP"], best)
    lines += heatmap_codec_section(records_by_group, best, state.get("heatmap_caches", {}), context)
    missing = missing_runs(state, quick)
    if missing:
        lines += ["", "## Not run yet", "", "These runs of the plan have no result yet (`python tools/quality.py` "
                  "trains them, reusing every run above): " + ", ".join(f"`{name}`" for name in missing) + "."
                  + ("" if best else " Once the core recipes have every seed, the best "
                     "of them also gets its slim-student, online-teacher and `+crd=1` runs.")]
    if state.get("superseded_runs"):
        lines += ["", f"{len(state['superseded_runs'])} earlier runs were trained under another trainer revision, "
                  "teacher, data or config; they are kept in `quality.json` (`superseded_runs`) and not shown."]
    (out_dir / "QUALITY.md").write_text("\n".join(lines) + "\n")


def conclusions(groups, verdicts, best: str | None) -> list[str]:
    lines = []
    clear = [v for v in verdicts if v[3] > 0 and v[4] > 3]
    for student, recipe, targets, gain, gap in sorted(verdicts, key=lambda v: -v[3]):
        judgement = ("beats no-KD beyond the spread" if gap > 3 else
                     "is above no-KD, within the spread" if gain > 0 else "is not better than no-KD")
        source = {"cache": "from the cache", "online": "from the teacher run online", "none": "(no teacher targets)"}
        lines.append(f"- {student} student, `{recipe}` {source.get(targets, targets)}: {judgement} "
                     f"({gain:+.4f} mAP, {gap:+.2f} x the larger std).")
    if not verdicts:
        lines.append("- No recipe has 3 seeds beside 3 no-KD seeds yet; no comparison is drawn.")
    elif not clear:
        lines.append("- **No recipe beats its no-KD twin beyond the run-to-run spread** (gap > 3 x the larger std): "
                     "on this benchmark, distillation from the cache does not measurably help yet.")
    crd = [v for v in verdicts if v[1] == "crd=1" and v[0] == "half"]
    if crd:
        _, _, _, gain, gap = crd[0]
        top = max((v for v in verdicts if v[0] == "half"), key=lambda v: v[3])
        lines.append(f"- CRD alone (`crd=1`) changes the half student's mAP by {gain:+.4f} ({gap:+.2f} x the "
                     f"larger std) against no-KD; the best half recipe here is `{top[1]}` ({top[3]:+.4f}).")

    def on_top(what: str, recipe: str, targets: str, under: str, versus: str) -> None:
        """A line on what ``recipe`` changes against ``under`` (both with 3 seeds) for the half student."""
        values, base = groups.get(("half", recipe, targets)), groups.get(("half", under, targets_of(under)))
        if values and base and len(values) >= 3 and len(base) >= 3:
            change, gap = compare(values, base)
            lines.append(f"- {what}: `{recipe}`{versus} changes the half student's mAP by {change:+.4f} "
                         f"({float('nan') if gap is None else gap:+.2f} x the larger std).")

    if best is not None and best != INIT and INIT in best.split(","):  # what the cache adds to the weights alone
        on_top("The cached targets on top of the teacher's weights", best, targets_of(best), INIT,
               f" against `{INIT}` alone")
    # what a core recipe's one added term changes against the core recipe (of several parts) without it
    for recipe, under in itertools.permutations(CORE_RECIPES, 2):
        parts, under_parts = set(recipe.split(",")), set(under.split(","))
        added = parts - under_parts
        if len(under_parts) > 1 and under_parts < parts and len(added) == 1 and INIT not in added:
            on_top(f"`{added.pop()}` on top of `{under}`", recipe, targets_of(recipe), under, f" against `{under}`")
    if best is not None:  # what CRD adds on top of the best core recipe
        on_top(f"CRD on top of the best core recipe (`{best}`)", with_crd(best), "cache", best, "")
    return lines


def heatmap_codec_section(records_by_group: dict[tuple[str, str, str], list[dict]], best: str | None,
                          bytes_per_value: dict[str, float], context: dict[str, Any]) -> list[str]:
    """What heatmaps need: the best recipe's slim student from the default cache and from each codec arm's,
    seed by seed (paired: same seed, same everything but the heatmap targets)."""
    from featcache import head_layers

    arms = heatmap_codec_arms(best) if best else ()
    default = {r["seed"]: r["mAP"] for r in records_by_group.get(("slim", best, "cache"), [])}
    if not arms or not default:
        return []
    default_codec = context.get("heatmap_codec", head_layers.HEATMAP_CODEC.name)
    header = ["heatmaps", "bytes / value", "seeds", "mAP mean ± std", "minus default, seed by seed", "mean difference"]
    rows = []
    for codec, targets in [(default_codec, "cache")] + [(codec, f"cache:{codec}") for codec in arms]:
        by_seed = {r["seed"]: r["mAP"] for r in records_by_group.get(("slim", best, targets), [])}
        if not by_seed:
            rows.append([f"`{codec}`", "", "0", "not run yet", "", ""])
            continue
        mean, std = describe(list(by_seed.values()))
        paired = {seed: value - default[seed] for seed, value in sorted(by_seed.items()) if seed in default}
        size = bytes_per_value.get(codec)
        rows.append([f"`{codec}`" + (" (default)" if targets == "cache" else ""),
                     "" if size is None else f"{size:.2f}", str(len(by_seed)),
                     f"{mean:.4f} ± {std:.4f}" if std == std else f"{mean:.4f}",
                     "" if targets == "cache" else " / ".join(f"{difference:+.4f}" for difference in paired.values()),
                     "" if targets == "cache" or not paired else f"{statistics.mean(paired.values()):+.4f}"])
    return ["", "## Heatmap codec", "",
            f"What heatmaps need: the slim student's best recipe (`{best}`) trained from caches that differ only in "
            "how the teacher's class heatmaps are stored (each arm its own cache of the same teacher and scenes), "
            "same seeds. With the teacher's weights the seeds' trajectories stay close, so the same seed's "
            "difference measures the codec; from scratch they diverge by about +-0.02. Bytes / value: the "
            "heatmap chunks' stored bytes over their values, on the demo teacher (a trained head's maps are "
            "mostly background).", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]


def target_table(groups, teacher_map: float, best: str | None) -> list[str]:
    """Issue #15's quality targets, each measured from the runs above (or "not run yet")."""
    def result(ok: bool | None) -> str:
        return "not run yet" if ok is None else "PASS" if ok else "MISS"

    rows = []
    half_base = groups.get(("half", NO_KD, "none"))
    best_runs = groups.get(("half", best, targets_of(best))) if best else None
    label = f"best core recipe `{best}`" if best else "best core recipe (after every core recipe's seeds)"
    gain = gap = retention = None
    if best_runs and half_base and len(best_runs) >= 3 and len(half_base) >= 3:
        gain, gap = compare(best_runs, half_base)
        gap, retention = float("inf") if gap is None else gap, statistics.mean(best_runs) / teacher_map
    rows.append([f"half, {label}: mean mAP - no-KD mean", ">= +0.05", "" if gain is None else f"{gain:+.4f}",
                 result(None if gain is None else gain >= 0.05)])
    rows.append([f"half, {label}: gap / larger std", "> 3", "" if gap is None else f"{gap:.1f}",
                 result(None if gap is None else gap > 3)])
    rows.append([f"half, {label}: retention (mean mAP / teacher mAP)", ">= 0.90",
                 "" if retention is None else f"{retention:.3f}", result(None if retention is None else retention >= 0.90)])
    slim = groups.get(("slim", best, targets_of(best))) if best else None
    ok = None
    if slim and half_base and len(slim) >= 3:
        ok = statistics.mean(slim) >= statistics.mean(half_base)
    named = f"`{best}`" if best else "the best core recipe"
    rows.append([f"slim, {named}: mean mAP >= half no-KD mean", f"{statistics.mean(half_base):.4f}" if half_base else "",
                 f"{statistics.mean(slim):.4f}" if slim else "", result(ok)])
    online = groups.get(("half", best, "online")) if best else None
    ok = measured = None
    if online and best_runs and half_base and len(half_base) >= 2:
        spread = max(half_base) - min(half_base)
        measured = online[0] - best_runs[0]  # same seed (0): online minus cached
        ok = abs(measured) <= spread
    rows.append([f"half, {named}, seed 0: online minus cached mAP", "within the no-KD spread (max - min)"
                 + (f" {max(half_base) - min(half_base):.4f}" if half_base and len(half_base) >= 2 else ""),
                 "" if measured is None else f"{measured:+.4f}", result(ok)])
    lines = ["| target | goal | measured | result |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Step time per recipe against no-KD is BENCHMARKS.md's figure 7 (the terms timed side by side), not "
              "this table's step s column."]
    return lines


def missing_runs(state: dict[str, Any], quick: bool) -> list[str]:
    done = {record_run(r) for r in state["runs"]}
    seeds = sorted({r["seed"] for r in state["runs"]} | ({0} if quick else {0, 1, 2}))
    return [run.name for run in dict.fromkeys(wanted_runs(state["runs"], seeds, quick, None)) if run not in done]


def plot(path: Path, groups, teacher_map: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{s}\n{r}\n({t})" for (s, r, t) in groups]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 4.5))
    for index, values in enumerate(groups.values()):
        ax.scatter([index] * len(values), values, s=28, zorder=3)
        ax.hlines(statistics.mean(values), index - 0.25, index + 0.25, colors="k", zorder=4)
    ax.axhline(teacher_map, color="tab:red", linestyle="--", label=f"teacher {teacher_map:.3f}")
    ax.set_xticks(range(len(groups)), labels, fontsize=7)
    ax.set_ylabel("val mAP")
    ax.set_title("mAP per recipe (dots: seeds, bar: mean)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="6 train / 3 val scenes, one epoch, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings side by side (threads split between them)")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    parser.add_argument("--only", choices=["half", "slim", "online"], default=None)
    parser.add_argument("--recipes", nargs="+", default=None,
                        help="a pilot: train only these recipes of the half student (--only slim: of the slim "
                             "one); give --out-dir elsewhere")
    parser.add_argument("--heatmap-codec", default=None,
                        help="a pilot: cache the teacher's heatmaps in this codec (e.g. fp16-zstd1) instead of "
                             "the build's default; give --out-dir elsewhere")
    parser.add_argument("--reuse-records", nargs="+", default=None, metavar="QUALITY_JSON",
                        help="other quality.json files (a pilot's): a run of this plan that one of their records "
                             "trained under the same key is taken from there, not retrained")
    parser.add_argument("--out-dir", default=str(REPO), help="where QUALITY.md, quality.json, quality.png go")
    parser.add_argument("--work-dir", default=None, help="default: work_dirs/quality (quick: work_dirs/quality_quick)")
    parser.add_argument("--report-only", action="store_true", help="rewrite QUALITY.md from quality.json")
    parser.add_argument("--rekey-proof", default=None, metavar="QUALITY_JSON",
                        help="re-key the records to the current trainer revision, where this quality.json's runs "
                             "(trained at it) reproduce theirs bit for bit; then rewrite the report")
    parser.add_argument("--rekey-baseline", default=None, metavar="QUALITY_JSON",
                        help="with --rekey-proof on another machine than the records': the same runs trained here "
                             "at the records' trainer revision, which the proof must reproduce")
    parser.add_argument("--run-spec", help=argparse.SUPPRESS)  # internal: one run, in its own process
    args = parser.parse_args()
    if args.run_spec:
        with open(args.run_spec) as stream:
            spec = json.load(stream)
        record = train_and_evaluate(spec)
        with open(os.path.join(spec["work_dir"], "record.json"), "w") as stream:
            json.dump(record, stream)
        return
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.work_dir = args.work_dir or str(REPO / ("work_dirs/quality_quick" if args.quick else "work_dirs/quality"))
    if args.rekey_proof:
        state = load(Path(args.out_dir) / "quality.json")
        log(rekey(state, load(Path(args.rekey_proof)), args.quick,
                  load(Path(args.rekey_baseline)) if args.rekey_baseline else None))
        save(Path(args.out_dir) / "quality.json", state)
        write_report(Path(args.out_dir), state, state["context"], args.quick)
        return
    if args.report_only:
        state = load(Path(args.out_dir) / "quality.json")
        write_report(Path(args.out_dir), state, state["context"], args.quick)
        return
    execute(args)


if __name__ == "__main__":
    main()
