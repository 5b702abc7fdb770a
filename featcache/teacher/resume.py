"""Resuming a build: what an existing cache records against what this build would write.

A resumed cache must hold samples the same teacher computed the same way, so the build compares
the cache's identity, samples, teacher code and stated BEV layouts with its own and refuses on any
difference (:func:`resume_problems`, :func:`mismatch_error`). Library versions only warn
(:func:`changed_versions`): they change the arithmetic slightly, not what a sample means.
Plain functions with explicit arguments; the build (:mod:`featcache.teacher.build`) logs and raises.
"""
from __future__ import annotations

from typing import Any, Sequence

from featcache import format, layout
from featcache.errors import CacheMismatchError
from featcache.teacher import models
from featcache.teacher.samples import source_mismatches, source_prefix_difference
from featcache.writer import CacheWriter

# what a resume under other versions warns about: these change the teacher's arithmetic
TEACHER_LIBRARIES = ("torch", "mmcv", "mmdet3d", "mmdet", "mmengine", "spconv")


def changed_versions(recorded: dict[str, str], now: dict[str, str]) -> list[str]:
    """``name old -> new`` for each of :data:`TEACHER_LIBRARIES` whose version differs from the cache's record."""
    return [f"{name} {recorded.get(name, 'absent')} -> {now.get(name, 'absent')}" for name in TEACHER_LIBRARIES
            if recorded.get(name) != now.get(name) and (name in recorded or name in now)]


def identity_mismatches(existing: format.Manifest, wanted: dict[str, Any]) -> list[str]:
    """Each identity field (``Manifest.identity``) where the cache differs from this build's."""
    have = existing.identity()
    return [f"{name}: cache has {have[name]!r}, this build has {wanted[name]!r}"
            for name in wanted if have.get(name) != wanted[name]]


def key_differences(cache_keys: Sequence[str], keys: Sequence[str], count: int = 5) -> list[str]:
    """The first rows whose sample differs between the cache and this build's dataset, by key."""
    rows = [row for row in range(max(len(cache_keys), len(keys)))
            if row >= len(cache_keys) or row >= len(keys) or cache_keys[row] != keys[row]]
    def at(sequence: Sequence[str], row: int) -> str:
        return repr(sequence[row]) if row < len(sequence) else "no sample"
    lines = [f"row {row}: cache has {at(cache_keys, row)}, this build has {at(keys, row)}" for row in rows[:count]]
    if len(rows) > count:
        lines.append(f"... {len(rows) - count} more rows differ")
    return lines


def stated_layout_mismatches(stated_layouts: Any, manifest: format.Manifest) -> list[str]:
    """Where --bev-layout (``layout.parse_layout_option``) states another layout than a resumed cache recorded."""
    problems = []
    for spec in manifest.layers:
        said = layout.stated_layout(stated_layouts, spec.name)
        if said is not None and spec.layout is not None and said != spec.bev_layout:
            problems.append(f"bev layout of {spec.name}: cache has {spec.bev_layout.name}, --bev-layout states "
                            f"{said.name}")
    return problems


def resume_problems(writer: CacheWriter, identity: dict[str, Any], *, modules: Sequence[str], keys: Sequence[str],
                    sources: Sequence[str] | None, teacher_code: Any, stated_layouts: Any) -> list[str]:
    """Every way the cache open in ``writer`` differs from this build: its hooked modules, its identity
    (``identity``, as the build computes it for the cache's layers), its samples by key and by source
    file, the teacher's own code, and the layouts --bev-layout states. Empty: it may be resumed."""
    recorded = writer.manifest.extra.get("modules")
    problems = [] if recorded == list(modules) else [
        f"modules: cache has {recorded}, this build has {list(modules)}"]
    problems += identity_mismatches(writer.manifest, identity)
    cache_keys, cache_sources = writer.keys(), writer.sources()
    if writer.manifest.dataset_id != identity["dataset_id"]:
        problems += key_differences(cache_keys, keys)
    problems += [f"sample {line}" for line in source_mismatches(cache_keys, cache_sources, keys, sources)[:5]]
    prefix = source_prefix_difference(cache_keys, cache_sources, keys, sources)
    problems += [prefix] if prefix else []
    if writer.manifest.teacher_code is not None:  # caches written before it was recorded: not checked
        problems += models.source_differences(writer.manifest.teacher_code, teacher_code)
    problems += stated_layout_mismatches(stated_layouts, writer.manifest)
    return problems


def regression_cells_hint(have: dict[str, Any] | None, wanted: dict[str, Any] | None, head_outputs: Any) -> str:
    """What to change when the cells holding regression outputs differ: the cache's record ``have``,
    this build's ``wanted`` (``Manifest.regression_cells``; None: every cell), given --head-outputs."""
    if have is None and wanted is not None and head_outputs:
        return " It keeps its regression outputs at every cell: resume it with --dense-head-outputs."
    if have is not None and wanted is None:
        return " It keeps its regression outputs at box centres only: resume it without --dense-head-outputs."
    if have is not None and have.get("annotated_centres_sha256") != wanted["annotated_centres_sha256"]:
        return (" Its regression outputs are kept at the centres of other annotated boxes: the "
                "dataset's annotations changed since it was built.")
    return ""


def mismatch_error(out: str, problems: list[str], hint: str, repair: bool) -> CacheMismatchError:
    """The refusal to resume (or, ``repair``, to repair with verify --repair) a cache built differently."""
    if repair:  # verify --repair: the cache is right, the repair's teacher is not
        return CacheMismatchError(
            f"{out} was built differently from what verify --repair would rebuild its samples with:\n  "
            + "\n  ".join(problems) + "\nverify --repair uses the teacher config, checkpoint and "
            "--cfg-options the manifest records; give --teacher-config, --checkpoint or --cfg-options only "
            "where those moved, as the build had them. Nothing was changed." + hint)
    return CacheMismatchError(f"{out} was built differently:\n  " + "\n  ".join(problems) +
                              "\nUse another --out, or --force to erase it and start over." + hint)
