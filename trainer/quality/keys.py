"""Run keys: what a quality run's result depends on, so that a record is reused exactly while it still holds.

Every record of ``quality.json`` carries the key it was trained under (``run_key``): the student config's
text, recipe, seed, source of targets, teacher checkpoint, scenes, trainer revision and the codecs of the
cached layers the recipe reads, and (key v3) what else shapes a result: the featcache code that builds and reads
the targets, the scene generator's code, the teacher config's text and the libraries' versions
(``code_identity``). Config texts are taken relative to the repository, so a checkout elsewhere keeps its
records. A change proven to leave results alone re-keys the records (``rekey``) instead of retraining them.
"""
from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import Any, Callable, Collection

from trainer.quality.plan import (NO_KD, REPO, TEACHER_CONFIG, Run, heatmap_codec_of, kinds_read, recipe_kinds,
                                  record_run, student_config, student_parts, target_source)
from trainer.quality.runs import now

# What decides the outcome of a run: every trainer module that shapes a result, sub-packages included (paths
# relative to trainer/; a glob, so a new module - a loss term, the weight inheritance - joins the key the day it
# is added). Not the command line (it only parses), the package docstring, nor this benchmark's own package
# trainer/quality/ (plans, keys and reports: it trains through trainer.train and scores through
# trainer.evaluation, which are in the key).
TRAINER_FILES = tuple(sorted(path.relative_to(REPO / "trainer").as_posix() for path in (REPO / "trainer").rglob("*.py")
                             if path.relative_to(REPO / "trainer").as_posix() not in ("__init__.py", "cli.py")
                             and path.relative_to(REPO / "trainer").parts[0] != "quality"))


# The featcache code a run's targets pass through: the storage core (codecs, reader, backends) and the teacher
# wing (recording, build), not deploy/ nor the benchmarks' figures. And the scene generator's code (its version
# string, in the scenes' stamp, is bumped by hand).
FEATCACHE_FILES = tuple(sorted(path.relative_to(REPO).as_posix() for folder in ("featcache", "featcache/teacher")
                               for path in (REPO / folder).glob("*.py")))
GENERATOR_FILES = ("featcache/scenes.py", "tools/generate_scenes.py")
#: the context fields ``code_identity`` adds, in key v3 (a context without them is keyed v2)
CODE_FIELDS = ("featcache_revision", "generator_revision", "teacher_config_sha256", "libraries")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files_revision(root: Path, names: Collection[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    return digest.hexdigest()[:16]


def trainer_revision() -> str:
    return _files_revision(REPO / "trainer", TRAINER_FILES)


def code_identity() -> dict[str, str]:
    """What shapes a result beside the trainer: featcache's revision (``FEATCACHE_FILES``), the generator's
    (``GENERATOR_FILES``), the teacher config's text (with its bases) and the installed libraries' versions."""
    from featcache.format import library_versions

    libraries = {name: version for name, version in library_versions().items() if name != "featcache"}
    return {"featcache_revision": _files_revision(REPO, FEATCACHE_FILES),
            "generator_revision": _files_revision(REPO, GENERATOR_FILES),
            "teacher_config_sha256": sha256(config_text(TEACHER_CONFIG).encode())[:16],
            "libraries": ", ".join(f"{name} {version}" for name, version in sorted(libraries.items()))}


@functools.lru_cache(maxsize=None)  # every run key holds it: parse each config once per process
def config_text(path: Path, relative: bool = True) -> str:
    """A config's text with its bases, as mmengine lists it; each file named relative to the repository
    (``relative=False``: by its absolute path, as key v2 held it)."""
    from featcache.teacher import models

    text = models.load_config(str(path)).text
    return text.replace(f"{REPO.as_posix()}/", "") if relative else text


def run_key(run: Run, context: dict[str, Any], quick: bool) -> str:
    """What a run's result depends on: config (with its bases), recipe, seed, targets, teacher
    checkpoint, data stamp, trainer revision, size, and the codecs of the cached layers the recipe's
    terms read (what their targets were stored as; ``codecs_read``): a heatmap codec change retrains
    the recipes distilling heatmaps, not no-KD or the feature terms. The key holds the targets' source, not
    which cache: a run from a ``cache:score8-zstd3`` arm is the same run as one from a default cache that
    stored score8 heatmaps. With the context's ``CODE_FIELDS`` (``code_identity``) the key is v3: they join it
    and config texts are relative to the repository; without them, v2."""
    codecs = codecs_read(run, context["codecs_by_kind"])
    if not all(field in context for field in CODE_FIELDS):  # v2: a context from before code_identity
        return sha256(("v2\0" + _key_text(run, context, quick, codecs, relative=False)).encode())[:24]
    identity = "\0".join(str(context[field]) for field in CODE_FIELDS)
    return sha256(("v3\0" + _key_text(run, context, quick, codecs) + "\0" + identity).encode())[:24]


def legacy_run_key(run: Run, context: dict[str, Any], quick: bool) -> str:
    """The key of records written before ``run_key`` v2, which held every layer's codecs
    (``cache_codecs``): such a record that matches it under the current context is current and is re-keyed."""
    return sha256(_key_text(run, context, quick, context["cache_codecs"], relative=False).encode())[:24]


def _key_text(run: Run, context: dict[str, Any], quick: bool, codecs: str, relative: bool = True) -> str:
    labelled = student_parts(run.student)[1]
    return "\0".join([config_text(student_config(run.student), relative), run.recipe, str(run.seed),
                      target_source(run.targets), context["teacher_sha256"], context["data_stamp"],
                      context["trainer_revision"], codecs, "quick" if quick else "full",
                      *([f"labelled={labelled}"] if labelled is not None else [])])


def codecs_read(run: Run, codecs_by_kind: dict[str, str]) -> str:
    """``'feature: pts_neck.0 int8-zstd3; heatmap: ...'`` for the kinds ``run`` reads ('' for none)."""
    return "; ".join(f"{kind}: {codecs_by_kind[kind]}" for kind in kinds_read(run) if kind in codecs_by_kind)



def teacher_key(context: dict[str, Any]) -> str:
    """The key of the teacher's evaluation: its checkpoint, the scenes and the trainer revision (the evaluation
    code); with ``code_identity`` in the context, that too."""
    text = context["teacher_sha256"] + context["data_stamp"] + context["trainer_revision"]
    if all(field in context for field in CODE_FIELDS):
        text += "\0" + "\0".join(str(context[field]) for field in CODE_FIELDS)
    return sha256(text.encode())


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


def heatmap_bytes_per_value(cache: Any) -> float:
    """Stored (compressed) bytes per heatmap value over the cache's samples (``store.chunk_nbytes``)."""
    from featcache.inspection import stored_bytes_per_sample

    layers = [layer for layer in cache.manifest.layers if layer.kind == "heatmap"]
    per_sample = stored_bytes_per_sample(cache, [array for layer in layers for array in layer.arrays()], range(len(cache)))
    values = sum(math.prod(layer.shape) for layer in layers)
    return (per_sample or 0.0) / values if values else float("nan")


def arm_context(context: dict[str, Any], run: Run) -> dict[str, Any]:
    """The context of the cache ``run`` read, derived from the default cache's without building the arm's: a
    heatmap-codec arm's cache differs from the default one only in its heatmaps' codec (``build_cache``)."""
    codec = heatmap_codec_of(run.targets)
    if codec is None:
        return context
    kinds = dict(context["codecs_by_kind"])
    kinds["heatmap"] = kinds["heatmap"].replace(context["heatmap_codec"], codec)
    return {**context, "codecs_by_kind": kinds}


def rekey(state: dict[str, Any], proof: dict[str, Any], quick: bool, baseline: dict[str, Any] | None = None,
          retrain_kinds: Collection[str] = ()) -> str:
    """Move the records of ``state``'s trainer revision to the current one, where ``proof`` (the quality.json of
    runs trained at the current revision, e.g. ``--recipes no-kd heatmap=10,reg=1,init --seeds 0 --only half``)
    reproduces the recorded mAP of every one of its runs bit for bit: a trainer change that leaves results alone
    need not retrain the plan. On another machine than the records' (float results depend on the CPU's kernels),
    ``baseline`` holds the same runs trained there at the records' revision, and the proof must reproduce those.
    Every current record whose key is its run's key under the old revision (checked, not assumed) is re-keyed;
    the proof is kept in ``state["rekeyed"]``. Refuses (SystemExit) otherwise. ``retrain_kinds``: kinds of teacher
    maps whose distillation the change did alter (a fixed bug in a term): records of recipes distilling any of them
    keep their old key (the next run supersedes and retrains them), whichever source their targets came from."""
    old_context = state["context"]
    new_context = {**old_context, "trainer_revision": trainer_revision(), **code_identity()}
    if proof["context"]["trainer_revision"] != new_context["trainer_revision"]:
        raise SystemExit(f"the proof was trained at trainer revision {proof['context']['trainer_revision']}, the "
                         f"trainer now is {new_context['trainer_revision']}: train the proof again")
    other = [field for field in CODE_FIELDS if field in proof["context"] and proof["context"][field] != new_context[field]]
    if other:
        raise SystemExit(f"the proof was trained under another {', '.join(other)} than this checkout's: train the "
                         "proof again")
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
    moved = kept = 0
    records = {record_run(record): record for record in state["runs"]}
    for run, record in records.items():
        if recipe_kinds(run.recipe) & set(retrain_kinds):
            kept += 1
            continue
        if record["key"] == run_key(run, arm_context(old_context, run), quick):
            record["key"] = run_key(run, arm_context(new_context, run), quick)
            moved += 1
    if state["teacher"].get("key") == teacher_key(old_context):
        state["teacher"]["key"] = teacher_key(new_context)
    state["context"] = new_context
    entry = {"from": old_context["trainer_revision"], "to": new_context["trainer_revision"], "proof": proven,
             "records": moved, "at": now()}
    if retrain_kinds:
        entry.update(retrain_kinds=sorted(retrain_kinds), left_to_retrain=kept)
    state.setdefault("rekeyed", []).append(entry)
    return (f"re-keyed {moved} of {len(records)} records from trainer {old_context['trainer_revision']} to "
            f"{new_context['trainer_revision']} (reproduced: {'; '.join(proven)})"
            + (f"; {kept} records distilling {', '.join(sorted(retrain_kinds))} left to retrain" if kept else ""))


def without_code(context: dict[str, Any]) -> dict[str, Any]:
    """``context`` without ``CODE_FIELDS``: what a run was keyed under before key v3."""
    return {key: value for key, value in context.items() if key not in CODE_FIELDS}


def adopt_v3(state: dict[str, Any], context_of: Callable[[Run], dict[str, Any]], quick: bool) -> int:
    """Once, when ``state``'s context predates key v3: every current record whose key is its run's v2 key under
    the current context (same trainer revision, teacher, scenes, codecs) takes its v3 key. Such records were
    trained or re-keyed by proof at this trainer revision, and v2 keys held neither the code identity nor
    repository-relative configs; the adoption is recorded (``state["key_v3"]``). Returns how many were adopted;
    0 (nothing done) once the context holds the code identity."""
    if not state.get("runs") or all(field in state.get("context", {}) for field in CODE_FIELDS):
        return 0
    adopted = 0
    for record in state["runs"]:
        run = record_run(record)
        if record["key"] == run_key(run, without_code(context_of(run)), quick):
            record["key"] = run_key(run, context_of(run), quick)
            adopted += 1
    if adopted:
        context = context_of(Run("half", NO_KD, 0, "none"))
        state["key_v3"] = {"records": adopted, "trainer_revision": context["trainer_revision"], "at": now(),
                           **{field: context[field] for field in CODE_FIELDS}}
        if state.get("teacher") and state["teacher"].get("key") == teacher_key(without_code(context)):
            state["teacher"]["key"] = teacher_key(context)
    return adopted
