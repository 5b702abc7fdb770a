"""``featcache build``: run a teacher once over a dataset split and cache its features.

The loop: a DataLoader yields test-pipeline batches, the teacher runs with forward hooks (and
stops after the last hooked module, skipping heads and NMS), and a background writer encodes
and stores each sample while the teacher computes the next. Resuming is the default: rows whose
records say complete are skipped. Under torchrun every rank builds the rows it owns.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from featcache import boxes as boxes_
from featcache import codecs, format, head_layers, layout, location
from featcache.teacher import heads, models
from featcache.teacher.options import resolve_config_path
from featcache.teacher.samples import annotated_centres, source_mismatches, source_prefix_difference
from featcache import lock as cache_lock
from featcache.errors import CacheMismatchError, ConfigError, FeatcacheError, InputDataError
from featcache.teacher.options import BuildOptions, check_codec_option  # noqa: F401  (featcache.teacher.build.BuildOptions)
from featcache.teacher.detector import Teacher
from featcache.world import World, close_world, init_world
from featcache.writer import BackgroundWriter, CacheWriter

logger = logging.getLogger("featcache.teacher.build")


@dataclass
class BuildResult:
    location: str
    total: int
    written: int
    already_complete: int
    invalid_keys: list[str]
    seconds: float
    stored_bytes: int
    raw_bytes: int
    nonzero: dict[str, dict[str, float]] | None = None  # per layer, over every sample built so far (all runs)
    nearly_zero_layers: tuple[str, ...] = ()  # layers (nearly) all zeros in every sample this run wrote
    truncated_boxes: dict[str, int] | None = None  # --boxes: sample key -> boxes left out past --max-boxes


# what a resume under other versions warns about: these change the teacher's arithmetic
TEACHER_LIBRARIES = ("torch", "mmcv", "mmdet3d", "mmdet", "mmengine", "spconv")


def library_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {}
    for package in ("featcache", "torch", "mmdet3d", "mmdet", "mmengine", "mmcv", "spconv", "zarr", "numcodecs", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _pipeline_list(dataset_cfg) -> list[dict[str, Any]]:
    return json.loads(json.dumps(dataset_cfg.get("pipeline", []), default=str))


def _mismatches(existing: format.Manifest, wanted: dict[str, Any]) -> list[str]:
    have = existing.identity()
    return [f"{name}: cache has {have[name]!r}, this build has {wanted[name]!r}"
            for name in wanted if have.get(name) != wanted[name]]


def _key_differences(cache_keys: Sequence[str], keys: Sequence[str], count: int = 5) -> list[str]:
    """The first rows whose sample differs between the cache and this build's dataset, by key."""
    rows = [row for row in range(max(len(cache_keys), len(keys)))
            if row >= len(cache_keys) or row >= len(keys) or cache_keys[row] != keys[row]]
    def at(sequence: Sequence[str], row: int) -> str:
        return repr(sequence[row]) if row < len(sequence) else "no sample"
    lines = [f"row {row}: cache has {at(cache_keys, row)}, this build has {at(keys, row)}" for row in rows[:count]]
    if len(rows) > count:
        lines.append(f"... {len(rows) - count} more rows differ")
    return lines


def _bev_range(cfg) -> list[float]:
    """The extent of the teacher's BEV outputs (``format.bev_extent`` of its ``point_cloud_range``)."""
    extent = format.bev_extent(cfg.get("point_cloud_range"))
    if extent is None:
        raise ConfigError(f"the teacher config has no point_cloud_range (6 numbers; it has "
                          f"{list(cfg.get('point_cloud_range') or []) or 'none'}): the cells holding box centres, "
                          "where regression outputs are kept, are not known; set it, or build with "
                          "--dense-head-outputs")
    return extent


class Builder:
    """One build run; see :func:`build_cache`."""

    def __init__(self, options: BuildOptions) -> None:
        self.options = options
        # every option and --out first: a mistake fails now, before the model, dataset and teacher set-up
        self.target: location.LocationState = options.validate()
        self.device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: CUDA is not available here (torch {torch.__version__}); "
                              "use --device cpu")
        self.world: World = init_world()
        # one writer per cache: taken before the teacher's set-up and before anything at --out is created or
        # erased, held to the end of the run (build_cache releases it)
        command = ("featcache verify --repair" if options.rows is not None
                   else "featcache build --force" if options.force else "featcache build")
        self.lock = cache_lock.acquire_for_world(options.out, self.world, command)
        try:
            self._set_up(options)
        except BaseException:
            self.lock.release(discard=True)  # a new --out is left as it was: absent
            raise

    def _set_up(self, options: BuildOptions) -> None:
        self.teacher = Teacher(options.teacher_config, options.checkpoint, options.layers, split=options.split,
                               cfg_options=options.cfg_options, device=self.device,
                               trust_globals=options.trust_globals, head_outputs=options.head_outputs)
        self.modules, self.cfg, self.keys = self.teacher.modules, self.teacher.cfg, self.teacher.keys
        self.head_outputs = self.teacher.head_outputs
        # the model is built: --codec once more, against the detector's own layers (without --layers) and each head
        # output layer's kind, before the teacher runs
        check_codec_option(options.codec, self.modules, heads.parse_head_outputs(options.head_outputs),
                           {name: output.kind for name, output in self.head_outputs.items()})
        self.sources = self.teacher.sources
        self.dataset_cfg = self.teacher.dataset_cfg
        self.invalid_keys: list[str] = []
        self.stated_layouts = layout.parse_layout_option(options.bev_layout)
        # each BEV layer's layout (featcache.layout): measured on the shape probe's sample when the cache is
        # created, else the cache's record
        self.layouts: dict[str, dict[str, Any]] = {}
        # the teacher's own code (its config's custom_imports), part of the cache's identity
        self.teacher_code = models.custom_module_sources(self.cfg)
        # per sample key of this run, each layer's non-zero fraction; an invalid sample's are dropped
        self.nonzero: dict[str, dict[str, float]] = {}
        # --boxes: what the boxes record holds; its box width is known once the teacher ran (the probe), or
        # from the cache being resumed
        self.boxes_spec: boxes_.BoxesSpec | None = None
        self.truncated_boxes: dict[str, int] = {}  # sample key -> boxes past the capacity, left out
        # regression outputs are stored at box centres (head_layers.centre_cells) unless --dense-head-outputs: the
        # centres of each row's annotated boxes (every class), with the teacher's own boxes added per sample
        self.regression_layers = [name for name, output in self.head_outputs.items()
                                  if output.kind in head_layers.REGRESSION_OUTPUTS]
        self.at_centres = bool(self.regression_layers) and not options.dense_head_outputs
        self.annotated: list[np.ndarray] | None = None
        if self.at_centres:
            self.annotated = annotated_centres(self.teacher.dataset)
            self.bev_range = _bev_range(self.cfg)
            if not any(len(centres) for centres in self.annotated):
                logger.warning("the teacher's dataset annotates no boxes: its regression outputs are kept at the "
                               "teacher's own boxes only%s", "" if options.boxes else
                               " and without --boxes at none; add --boxes, or --dense-head-outputs")

    # -- identity ---------------------------------------------------------------------------
    def _identity(self, layer_names: list[str], codec_by_layer: dict[str, codecs.CodecSpec]) -> dict[str, Any]:
        return {
            "teacher_model_sha256": format.sha256_text(self.cfg.model.pretty_text if hasattr(self.cfg.model, "pretty_text")
                                                       else json.dumps(self.cfg.model.to_dict(), sort_keys=True, default=str)),
            "checkpoint_sha256": self._checkpoint_sha256,
            "layers": [(name, codec_by_layer[name].name) for name in layer_names],
            "dataset_id": format.dataset_identity(self.keys),
            "num_samples": len(self.keys),
            "pipeline_sha256": format.sha256_text(json.dumps(_pipeline_list(self.dataset_cfg), sort_keys=True, default=str)),
            "boxes": None if self.boxes_spec is None else self.boxes_spec.identity(),
            "regression_cells": self._regression_cells(),
        }

    def _regression_cells(self) -> dict[str, Any] | None:
        """Where the regression outputs hold values (``Manifest.regression_cells``); None: every cell."""
        if not self.at_centres:
            return None
        digest = hashlib.sha256()
        for centres in self.annotated:  # what a changed annotation file changes: the cells kept
            digest.update(np.int64(len(centres)).tobytes() + centres.astype(np.float32).tobytes())
        return {"at": head_layers.CELLS_AT_CENTRES, "margin": head_layers.CENTRE_MARGIN, "teacher_boxes": bool(self.options.boxes),
                "annotated_centres_sha256": digest.hexdigest()}

    def _codecs(self, names: list[str]) -> dict[str, codecs.CodecSpec]:
        """``--codec`` per layer (checked in ``_set_up``); head outputs default to ``head_layers.default_codec`` of
        their kind."""
        kinds = {name: self.head_outputs[name].kind for name in names if name in self.head_outputs}
        return codecs.parse_codec_option(self.options.codec, names, kinds=kinds,
                                         defaults={name: head_layers.default_codec(kind) for name, kind in kinds.items()})

    def _manifest(self, shapes: dict[str, tuple[int, ...]]) -> format.Manifest:
        names = list(shapes)
        codec_by_layer = self._codecs(names)
        identity = self._identity(names, codec_by_layer)
        layers = tuple(format.LayerSpec(name, *format.parse_layer_name(name, self.modules), shape=shapes[name], codec=codec_by_layer[name], meaning=self._meaning(name),
                                        layout=self.layouts.get(name))
                       for name in names)
        return format.Manifest(
            layers=layers, num_samples=len(self.keys), dataset_id=identity["dataset_id"],
            teacher_config=self.cfg.pretty_text, teacher_config_path=os.path.abspath(str(
                resolve_config_path(self.options.teacher_config))),
            teacher_model_sha256=identity["teacher_model_sha256"], checkpoint_sha256=self._checkpoint_sha256,
            pipeline=_pipeline_list(self.dataset_cfg), split=self.options.split, versions=library_versions(),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            extra={"modules": list(self.modules), "checkpoint_path": os.path.abspath(self.options.checkpoint),
                   "cfg_options": self.options.cfg_options,
                   "point_cloud_range": list(self.cfg.get("point_cloud_range", [])),
                   **({"regression_cells": identity["regression_cells"]} if identity["regression_cells"] else {})},
            key_scheme=format.KEY_SCHEME, teacher_code=self.teacher_code, boxes=self.boxes_spec)

    def _meaning(self, name: str) -> dict[str, Any] | None:
        if name not in self.head_outputs:
            return None
        meaning = self.head_outputs[name].meaning()
        if name in self.regression_layers:
            meaning["cells"] = head_layers.CELLS_AT_CENTRES if self.at_centres else head_layers.CELLS_DENSE
        return meaning

    def _stored(self, row: int, features: dict[str, np.ndarray],
                predicted: boxes_.TeacherBoxes | None) -> dict[str, np.ndarray]:
        """One sample's layers as the cache stores them: regression outputs zero away from the cells of its
        annotated and teacher boxes' centres (``head_layers.centre_cells``), unless --dense-head-outputs."""
        if not self.at_centres:
            return features
        centres = self.annotated[row]
        if predicted is not None and len(predicted):  # all of them: the cache keeps up to --max-boxes
            centres = np.concatenate([centres, predicted.bboxes[:, :2].astype(np.float64)])
        kept: dict[tuple, np.ndarray] = {}
        stored = dict(features)
        for name in self.regression_layers:
            value = features[name]
            grid = (tuple(value.shape[-2:]), self._layout(name))
            if grid not in kept:
                kept[grid] = head_layers.centre_cells(centres, self.bev_range, grid[0], layout=grid[1])
            stored[name] = np.where(kept[grid], value, np.zeros((), dtype=value.dtype))
        return stored

    def _layout(self, name: str) -> layout.BevLayout:
        recorded = self.layouts.get(name)
        return layout.BevLayout.from_dict(recorded) if recorded is not None else layout.CANONICAL

    def _measure_layouts(self, features: dict[str, np.ndarray], batch: dict[str, Any], key: str) -> None:
        """Each BEV layer's layout from the probe sample: its points (as the teacher saw them) binned on the
        layer's grid against the map (``layout.decide_layouts``); reported per layer."""
        points = batch["inputs"].get("points") if isinstance(batch.get("inputs"), dict) else None
        points_xy = None if not points else points[0][:, :2].detach().cpu().numpy()
        extent = format.bev_extent(self.cfg.get("point_cloud_range"))
        self.layouts, lines, warnings = layout.decide_layouts({name: value[0] for name, value in features.items()},
                                                              points_xy, extent, self.stated_layouts,
                                                              where=f" of sample {key!r}")
        for line in lines:
            logger.info("BEV layout: %s", line)
        for line in warnings:
            logger.warning("BEV layout: %s", line)

    def _check_stated_layouts(self, manifest: format.Manifest) -> list[str]:
        """Where --bev-layout states another layout than a resumed cache recorded."""
        problems = []
        for spec in manifest.layers:
            said = layout.stated_layout(self.stated_layouts, spec.name)
            if said is not None and spec.layout is not None and said != spec.bev_layout:
                problems.append(f"bev layout of {spec.name}: cache has {spec.bev_layout.name}, --bev-layout states "
                                f"{said.name}")
        return problems

    # -- teacher ----------------------------------------------------------------------------
    def _loader(self, rows: Sequence[int]):
        return self.teacher.loader(rows, self.options.batch_size, self.options.num_workers)

    def _open_or_create(self) -> tuple[CacheWriter, tuple[int, str, dict[str, np.ndarray]] | None]:
        """The cache's writer, plus the shape probe's sample (row, key, features) when this call created
        the cache: it is computed already and goes to the background writer with the others."""
        options, out = self.options, self.options.out
        # every rank looks before any rank writes (rank 0 creates only after this barrier), so all
        # take the same branch below
        state = location.check_build_target(out, options.storage_options, force=options.force)
        self.world.barrier()
        exists = state.kind == location.CACHE
        if exists and not options.force:
            writer = CacheWriter.open(out, options.storage_options)
            names = writer.manifest.layer_names
            if options.boxes:  # the box width comes from the cache; capacity and classes from this build
                fields = writer.manifest.boxes.fields if writer.manifest.boxes is not None else boxes_.LIDAR_BOX_FIELDS
                self.boxes_spec = boxes_.spec_for(self.cfg, self.teacher.class_names, len(fields), options.max_boxes)
            modules = writer.manifest.extra.get("modules")
            problems = [] if modules == list(self.modules) else [
                f"modules: cache has {modules}, this build has {list(self.modules)}"]
            identity = self._identity(names, self._codecs(names))
            problems += _mismatches(writer.manifest, identity)
            cache_keys = writer.keys()
            if writer.manifest.dataset_id != identity["dataset_id"]:
                problems += _key_differences(cache_keys, self.keys)
            problems += [f"sample {line}" for line in source_mismatches(cache_keys, writer.sources(),
                                                                                self.keys, self.sources)[:5]]
            prefix = source_prefix_difference(cache_keys, writer.sources(), self.keys, self.sources)
            problems += [prefix] if prefix else []
            if writer.manifest.teacher_code is not None:  # caches written before it was recorded: not checked
                problems += models.source_differences(writer.manifest.teacher_code, self.teacher_code)
            problems += self._check_stated_layouts(writer.manifest)
            self.layouts = {spec.name: spec.layout for spec in writer.manifest.layers if spec.layout is not None}
            if problems:
                hint, have = "", writer.manifest.regression_cells
                if have is None and identity["regression_cells"] is not None and options.head_outputs:
                    hint = " It keeps its regression outputs at every cell: resume it with --dense-head-outputs."
                elif have is not None and identity["regression_cells"] is None:
                    hint = " It keeps its regression outputs at box centres only: resume it without --dense-head-outputs."
                elif have is not None and have.get("annotated_centres_sha256") != \
                        identity["regression_cells"]["annotated_centres_sha256"]:
                    hint = (" Its regression outputs are kept at the centres of other annotated boxes: the "
                            "dataset's annotations changed since it was built.")
                if options.rows is not None:  # verify --repair: the cache is right, the repair's teacher is not
                    raise CacheMismatchError(
                        f"{out} was built differently from what verify --repair would rebuild its samples with:\n  "
                        + "\n  ".join(problems) + "\nverify --repair uses the teacher config, checkpoint and "
                        "--cfg-options the manifest records; give --teacher-config, --checkpoint or --cfg-options only "
                        "where those moved, as the build had them. Nothing was changed." + hint)
                raise CacheMismatchError(f"{out} was built differently:\n  " + "\n  ".join(problems) +
                                         "\nUse another --out, or --force to erase it and start over." + hint)
            self._warn_versions(writer.manifest.versions)
            return writer, None
        if self.world.is_main:
            if exists or state.kind == location.DAMAGED:
                logger.warning("--force: erasing featcache's files of the cache at %s (other files stay)", out)
            # the shape probe runs in this process: a worker started for one sample costs more than it
            rows, keys, batch = next(iter(self.teacher.loader([0], batch_size=1, num_workers=0)))
            features, predicted, head_problems = self._teacher_outputs(batch, keys)
            shapes = {name: tuple(value.shape[1:]) for name, value in features.items()}
            self._measure_layouts(features, batch, keys[0])
            if options.boxes:
                self.boxes_spec = boxes_.spec_for(self.cfg, self.teacher.class_names, predicted[0].bboxes.shape[1],
                                                  options.max_boxes)
            writer = CacheWriter.create(out, self._manifest(shapes), self.keys, options.storage_options,
                                        sources=self.sources)
            probe = (rows[0], keys[0], self._stored(rows[0], {name: value[0] for name, value in features.items()},
                                                    predicted[0] if options.boxes else None),
                     self._packed_boxes(keys[0], predicted[0]) if options.boxes else None, head_problems[0])
        self.world.barrier()
        if self.world.is_main:
            return writer, probe
        writer = CacheWriter.open(out, options.storage_options)
        self.boxes_spec = writer.manifest.boxes  # rank 0's probe decided the box width (and the layouts)
        self.layouts = {spec.name: spec.layout for spec in writer.manifest.layers if spec.layout is not None}
        return writer, None

    def _warn_versions(self, recorded: dict[str, str]) -> None:
        now = library_versions()
        changed = [f"{name} {recorded.get(name, 'absent')} -> {now.get(name, 'absent')}" for name in TEACHER_LIBRARIES
                   if recorded.get(name) != now.get(name) and (name in recorded or name in now)]
        if changed and self.world.is_main:
            logger.warning("resuming %s with other library versions than the cache was started with (%s): the "
                           "samples built now may differ slightly from the earlier ones; --force rebuilds all of "
                           "them with one set", self.options.out, ", ".join(changed))

    def _count_nonzero(self, features: dict[str, np.ndarray], keys: Sequence[str]) -> None:
        """Record each sample's non-zero fraction per layer (of the teacher's float32 output), by key: a sample
        found invalid when written is dropped from them (``_report_invalid``)."""
        for name, value in features.items():
            per_sample = value.reshape(value.shape[0], -1)
            fractions = np.count_nonzero(per_sample, axis=1) / max(per_sample.shape[1], 1)
            for key, fraction in zip(keys, fractions):
                self.nonzero.setdefault(key, {})[name] = float(fraction)

    def _nonzero_summary(self, writer: CacheWriter) -> tuple[dict[str, dict[str, float]], dict[str, tuple[int, float]]]:
        """Every rank's non-zero fractions, merged with those of earlier runs (group attribute
        ``featcache_nonzero``), and the layers (nearly) all zeros in every sample of this run, with that
        run's sample count and largest fraction. A repair (``rows``) leaves the recorded figures as they are."""
        mine: dict[str, list[float]] = {}  # per layer, in the order the samples were computed
        for fractions in list(self.nonzero.values()):
            for name, fraction in fractions.items():
                mine.setdefault(name, []).append(fraction)
        gathered = [mine]
        if self.world.size > 1:
            import torch.distributed as dist

            gathered = [None] * self.world.size
            dist.all_gather_object(gathered, mine)
        this_run: dict[str, list[float]] = {}
        for part in gathered:
            for name, fractions in (part or {}).items():
                this_run.setdefault(name, []).extend(fractions)
        nearly_zero = {name: (len(fractions), max(fractions)) for name, fractions in this_run.items()
                       if fractions and max(fractions) < format.NEAR_ZERO_FRACTION}
        earlier = dict(writer.group.attrs.get(format.NONZERO_ATTRIBUTE) or {})
        if self.options.rows is not None:
            return earlier, nearly_zero
        summary = {}
        for name in writer.manifest.layer_names:
            fractions, before = this_run.get(name, []), earlier.get(name) or {}
            count = len(fractions) + int(before.get("samples", 0))
            if not count:
                continue
            total = sum(fractions) + float(before.get("mean", 0.0)) * int(before.get("samples", 0))
            summary[name] = {"samples": count, "mean": total / count,
                             "min": min(fractions + ([before["min"]] if "min" in before else [])),
                             "max": max(fractions + ([before["max"]] if "max" in before else []))}
        return summary, nearly_zero

    def _teacher_outputs(self, batch, keys: list[str]
                         ) -> tuple[dict[str, np.ndarray], list[boxes_.TeacherBoxes], list[str | None]]:
        """The batch's features, with ``--boxes`` each sample's predictions (else an empty list), and per
        sample what was non-finite in the head the boxes came from (None: nothing, or no ``--boxes``)."""
        try:
            if self.options.boxes:
                features, predicted, head_problems = self.teacher.features_and_checked_boxes(batch)
            else:
                features, predicted, head_problems = self.teacher.features(batch), [], [None] * len(keys)
            self._count_nonzero(features, keys)
            return features, predicted, head_problems
        except Exception as exc:
            raise InputDataError(f"the teacher failed on sample(s) {', '.join(map(repr, keys))} "
                                 f"({', '.join(self.teacher.lidar_paths(keys))}): {type(exc).__name__}: {exc}. "
                                 "No points in the point cloud range, or a malformed point file?") from exc

    def _packed_boxes(self, key: str, predicted: boxes_.TeacherBoxes) -> np.ndarray:
        row, left_out = self.boxes_spec.pack(predicted, key)
        if left_out:
            self.truncated_boxes[key] = left_out
            logger.warning("sample %r: the teacher returned %d boxes, the cache keeps %d (--max-boxes); the %d "
                           "lowest-scoring are left out", key, len(predicted), self.boxes_spec.capacity, left_out)
        return row

    def _report_invalid(self, key: str, exc: Exception) -> None:
        self.invalid_keys.append(key)
        self.nonzero.pop(key, None)  # the statistics are of valid samples only
        logger.error("sample %r: teacher output not finite (%s); not cached, marked invalid", key, exc)

    # -- run --------------------------------------------------------------------------------
    def run(self) -> BuildResult:
        start = time.perf_counter()
        self._checkpoint_sha256 = format.sha256_file(self.options.checkpoint)
        writer, probe = self._open_or_create()
        if self.options.rows is not None:
            writer.clear([row for row in self.options.rows if self.world.owns(row)])
        status = writer.status()
        wanted = set(range(len(self.keys))) if self.options.rows is None else set(self.options.rows)
        damaged = [row for row in sorted(wanted) if self.world.owns(row) and status[row] == format.STATUS_DAMAGED]
        if damaged:  # that row's damage alone: rebuilt like a missing one, its record rewritten whole
            logger.warning("%s: the records rows of %d samples are damaged (cut short, failing their crc32c, or "
                           "holding no status featcache writes); rebuilding them: %s", self.options.out, len(damaged),
                           ", ".join(repr(self.keys[row]) for row in damaged[:10]) + (" ..." if len(damaged) > 10 else ""))
        rows = [row for row in sorted(wanted) if self.world.owns(row)
                and status[row] in (format.STATUS_MISSING, format.STATUS_DAMAGED)
                and (probe is None or row != probe[0])]
        already = int(sum(1 for row in range(len(self.keys)) if self.world.owns(row)
                          and status[row] == format.STATUS_COMPLETE)) - writer.stats.samples
        background = BackgroundWriter(writer, depth=self.options.writer_depth, on_invalid=self._report_invalid)
        progress = _Progress(len(rows) + (probe is not None), writer, enabled=self.options.progress and self.world.is_main,
                             rank_note=f" (rank 0 of {self.world.size})" if self.world.size > 1 else "")
        try:
            if probe is not None:  # written while the teacher runs on the next samples
                background.submit(*probe)
                progress.update(1)  # the set-up's sample is one of the split's
            if rows:
                for batch_rows, batch_keys, batch in self._loader(rows):
                    features, predicted, head_problems = self._teacher_outputs(batch, batch_keys)
                    for position, (row, key) in enumerate(zip(batch_rows, batch_keys)):
                        sample = {name: value[position] for name, value in features.items()}
                        boxes = predicted[position] if self.options.boxes else None
                        background.submit(row, key, self._stored(row, sample, boxes),
                                          self._packed_boxes(key, boxes) if boxes is not None else None,
                                          head_problems[position])
                    progress.update(len(batch_rows))
        finally:
            # whatever was computed before a failure is still written
            try:
                background.close()
            finally:  # the bar ends at what was written (a sample is counted when it is handed to the writer)
                progress.close(done=writer.stats.samples + writer.stats.invalid)
        self.world.barrier()
        nonzero, nearly_zero = self._nonzero_summary(writer)
        if self.world.is_main:
            final = writer.status()
            try:
                if nonzero and self.options.rows is None:
                    writer.group.attrs[format.NONZERO_ATTRIBUTE] = nonzero
                writer.set_progress(complete=int((final == format.STATUS_COMPLETE).sum()),
                                    invalid=int((final == format.STATUS_INVALID).sum()),
                                    missing=int((final == format.STATUS_MISSING).sum()),
                                    **({"damaged": int((final == format.STATUS_DAMAGED).sum())}
                                       if (final == format.STATUS_DAMAGED).any() else {}))
            except OSError as exc:  # e.g. the disk filled up with the last chunk (zarr.json is replaced atomically)
                raise FeatcacheError(
                    f"{self.options.out}: every sample this run computed is written and recorded, but the build's "
                    f"summary in zarr.json (non-zero statistics and counts, for inspect) could not be saved: "
                    f"{type(exc).__name__}: {exc}. The cache is usable (featcache verify checks it); free space and run "
                    "the build again to record the counts (this run's non-zero statistics are lost)") from exc
            for name, (count, largest) in nearly_zero.items():
                logger.warning(
                    "layer %s is (nearly) all zeros in every one of the %d samples this build wrote (at most %.4f%% "
                    "non-zero): the teacher produces nothing there. Check the teacher before training from this "
                    "cache: its checkpoint matches the config, the point cloud range covers the points, and custom "
                    "ops return what the next module expects (e.g. voxel coordinates in (batch, z, y, x) order)",
                    name, count, 100 * largest)
        result = BuildResult(location=self.options.out, total=len(self.keys), written=writer.stats.samples,
                             already_complete=already, invalid_keys=list(self.invalid_keys),
                             seconds=time.perf_counter() - start, stored_bytes=writer.stats.stored_bytes,
                             raw_bytes=writer.stats.raw_bytes, nonzero=nonzero,
                             nearly_zero_layers=tuple(nearly_zero), truncated_boxes=dict(self.truncated_boxes))
        return result


class _Progress:
    """tqdm bar with samples/s, ETA (tqdm's own) and MB/s written, bytes/sample (from the writer)."""

    def __init__(self, total: int, writer: CacheWriter, enabled: bool, rank_note: str = "") -> None:
        self.writer = writer
        self.start = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="sample", desc=f"featcache build{rank_note}", dynamic_ncols=True)

    def update(self, count: int) -> None:
        if self.bar is None:
            return
        stats = self.writer.stats
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if stats.samples:
            self.bar.set_postfix_str(f"{stats.stored_bytes / elapsed / 1e6:.1f} MB/s written, "
                                     f"{stats.stored_bytes / stats.samples / 1e6:.2f} MB/sample "
                                     f"({stats.raw_bytes / max(stats.stored_bytes, 1):.1f}x smaller than fp32)",
                                     refresh=False)
        self.bar.update(count)

    def close(self, done: int | None = None) -> None:
        """Close the bar, showing ``done`` samples if given: a write that failed is not shown as done."""
        if self.bar is not None:
            if done is not None and done != self.bar.n:
                self.bar.n = done
                self.bar.set_description_str(f"{self.bar.desc} (stopped)", refresh=False)
                self.bar.refresh()
            self.bar.close()


def build_cache(options: BuildOptions) -> BuildResult:
    """Build (or resume, or with ``rows`` repair) the cache ``options.out``; see :class:`BuildOptions`."""
    builder = Builder(options)
    finished = False
    try:
        result = builder.run()
        finished = True
        return result
    finally:
        # a run that failed before creating the cache leaves a new --out as it found it (absent)
        builder.lock.release(discard=not finished)
        close_world(builder.world)
