"""``featcache build``: run a teacher once over a dataset split and cache its features.

The loop: a DataLoader yields test-pipeline batches, the teacher runs with forward hooks (and
stops after the last hooked module, skipping heads and NMS), and a background writer encodes
and stores each sample while the teacher computes the next. Resuming is the default: rows whose
records say complete are skipped. Under torchrun every rank builds the rows it owns.
"""
from __future__ import annotations

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
from featcache.format import library_versions
from featcache.teacher import heads, models, resume
from featcache.teacher.options import resolve_config_path
from featcache.teacher.centres import CentreCells, bev_range
from featcache.teacher.nonzero import NonzeroFractions
from featcache.teacher.progress import BuildProgress
from featcache.teacher.samples import annotated_centres
from featcache.teacher.unlabelled import unlabelled_rows
from featcache import lock as cache_lock
from featcache.errors import ConfigError, FeatcacheError, InputDataError
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


def _pipeline_list(dataset_cfg) -> list[dict[str, Any]]:
    return json.loads(json.dumps(dataset_cfg.get("pipeline", []), default=str))


class Builder:
    """One build run; see :func:`build_cache`."""

    def __init__(self, options: BuildOptions) -> None:
        self.options = options
        # every option and --out first: a mistake fails now, before the model, dataset and teacher set-up
        options.validate()
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
        self.codec_option = check_codec_option(options.codec, self.modules, heads.parse_head_outputs(options.head_outputs),
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
        self.nonzero = NonzeroFractions()
        # --boxes: what the boxes record holds; its box width is known once the teacher ran (the probe), or
        # from the cache being resumed
        self.boxes_spec: boxes_.BoxesSpec | None = None
        self.truncated_boxes: dict[str, int] = {}  # sample key -> boxes past the capacity, left out
        # regression outputs are stored at box centres (head_layers.centre_cells) unless --dense-head-outputs: the
        # centres of each row's annotated boxes (every class), with the teacher's own boxes added per sample
        self.regression_layers = [name for name, output in self.head_outputs.items()
                                  if output.kind in head_layers.REGRESSION_OUTPUTS]
        self.at_centres = bool(self.regression_layers) and not options.dense_head_outputs
        self.centres: CentreCells | None = None
        # scans nobody annotated (featcache.teacher.unlabelled): recorded in the manifest; their regression outputs
        # can only be kept at the teacher's own boxes
        self.unlabelled = unlabelled_rows([self.teacher.dataset.get_data_info(row) for row in range(len(self.keys))])
        if self.unlabelled and self.at_centres and not options.boxes:
            raise ConfigError(f"{len(self.unlabelled)} of the split's {len(self.keys)} samples are unlabelled scans "
                              f"(e.g. {self.keys[self.unlabelled[0]]!r}): regression outputs are kept at box centres, "
                              "and these have no annotated boxes; add --boxes (the teacher's own boxes' centres), or "
                              "--dense-head-outputs")
        if self.at_centres:
            self.centres = CentreCells(annotated_centres(self.teacher.dataset), bev_range(self.cfg),
                                       self.regression_layers, bool(options.boxes))
            if len(self.unlabelled) == len(self.keys):
                logger.info("every sample is an unlabelled scan: regression outputs are kept at the teacher's own boxes")
            elif not any(len(centres) for centres in self.centres.annotated):
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
            "regression_cells": None if self.centres is None else self.centres.record(),
        }

    def _codecs(self, names: list[str]) -> dict[str, codecs.CodecSpec]:
        """``--codec`` per layer (checked in ``_set_up``); head outputs default to ``head_layers.default_codec`` of
        their kind."""
        kinds = {name: self.head_outputs[name].kind for name in names if name in self.head_outputs}
        return self.codec_option.choose(names, kinds=kinds,
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
                   **({"regression_cells": identity["regression_cells"]} if identity["regression_cells"] else {}),
                   **({"unlabelled_samples": len(self.unlabelled)} if self.unlabelled else {})},
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
        """One sample's layers as the cache stores them: ``CentreCells.stored``, or as the teacher computed
        them (--dense-head-outputs, or no regression outputs)."""
        return features if self.centres is None else self.centres.stored(row, features, predicted, self.layouts)

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
            identity = self._identity(names, self._codecs(names))
            problems = resume.resume_problems(writer, identity, modules=self.modules, keys=self.keys,
                                              sources=self.sources, teacher_code=self.teacher_code,
                                              stated_layouts=self.stated_layouts)
            self.layouts = {spec.name: spec.layout for spec in writer.manifest.layers if spec.layout is not None}
            if problems:
                hint = resume.regression_cells_hint(writer.manifest.regression_cells, identity["regression_cells"],
                                                    options.head_outputs)
                raise resume.mismatch_error(out, problems, hint, repair=options.rows is not None)
            changed = resume.changed_versions(writer.manifest.versions, library_versions())
            if changed and self.world.is_main:
                logger.warning("resuming %s with other library versions than the cache was started with (%s): the "
                               "samples built now may differ slightly from the earlier ones; --force rebuilds all of "
                               "them with one set", out, ", ".join(changed))
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

    def _teacher_outputs(self, batch, keys: list[str]
                         ) -> tuple[dict[str, np.ndarray], list[boxes_.TeacherBoxes], list[str | None]]:
        """The batch's features, with ``--boxes`` each sample's predictions (else an empty list), and per
        sample what was non-finite in the head the boxes came from (None: nothing, or no ``--boxes``)."""
        try:
            if self.options.boxes:
                features, predicted, head_problems = self.teacher.features_and_checked_boxes(batch)
            else:
                features, predicted, head_problems = self.teacher.features(batch), [], [None] * len(keys)
            self.nonzero.count(features, keys)
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
        self.nonzero.drop(key)
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
        progress = BuildProgress(len(rows) + (probe is not None), writer, enabled=self.options.progress and self.world.is_main,
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
        earlier = dict(writer.group.attrs.get(format.NONZERO_ATTRIBUTE) or {})  # earlier runs' figures
        nonzero, nearly_zero = self.nonzero.summary(self.world, earlier, writer.manifest.layer_names,
                                                    repair=self.options.rows is not None)
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
