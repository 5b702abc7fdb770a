"""The ``CacheDistiller`` model config ``featcache train`` wraps a student in (:func:`distiller_model_cfg`),
assembled step by step: what the terms need (:func:`term_needs`, asked of the terms' declarations), what
the teacher side holds (:func:`cache_side` from a cache, :func:`online_side` from a probe of an online
teacher), the layer pairs (:func:`layer_pairs`), and the checks and logs before training. Mismatches
between the cache and the student's data are errors before any training step."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from featcache import open_cache
from featcache.errors import ConfigError
from featcache.layout import CANONICAL, BevLayout
from featcache.teacher import models
from featcache.teacher.recording import LayerRecorder
from featcache.teacher.samples import check_covered, check_sources, dataset_data_root, dataset_keys
from featcache.format import bev_range
from trainer.grids import cache_layouts, cache_point_cloud_range, student_bev_range
from trainer.options import TrainOptions, resolve_terms, resolve_unlabelled
from trainer.response_pairs import (TeacherOutput, config_head_type, online_head_outputs, response_pairs,
                                    teacher_class_names)
from trainer.terms import TERMS
from trainer.unlabelled import add_unlabelled

log = logging.getLogger("trainer.train")


def _replace_pack(pipeline: list, cache: str, layers: Sequence[str], options: TrainOptions,
                  data_root: str | None, teacher_boxes: dict | None = None) -> list:
    """Pack with cached targets (and, with ``teacher_boxes``, the cached teacher boxes:
    ``PackDetInputsWithCache``), and record GT-paste regions (they have no cached target). ``data_root``
    (the dataset's) keys token-less samples as the build did."""
    pipeline = [dict(step, type="ObjectSampleRecorded") if step["type"] == "ObjectSample" else step
                for step in pipeline]
    packs = [index for index, step in enumerate(pipeline) if step["type"] == "Pack3DDetInputs"]
    if len(packs) != 1:
        raise ConfigError("the student's train pipeline must end with one Pack3DDetInputs step to attach cached "
                          f"targets to; found {len(packs)}")
    step = dict(pipeline[packs[0]])
    step.update(type="PackDetInputsWithCache", cache=cache, layers=list(layers), skip_corrupt=options.skip_corrupt,
                storage_options=options.storage_options, data_root=data_root, teacher_boxes=teacher_boxes)
    return pipeline[:packs[0]] + [step] + pipeline[packs[0] + 1:]


def _probe_student(student, dataset, module_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per-sample output shapes of the student's modules, from one real training sample."""
    from mmengine.dataset import pseudo_collate

    available = {name for name, _ in student.named_modules() if name}
    hooked = [name for name in module_names if name in available]
    if not hooked:
        return {}
    batch = student.data_preprocessor(pseudo_collate([dataset[0]]), True)
    with LayerRecorder(student, hooked, detach=True, stop_when_done=True) as recorder:
        student.loss(batch["inputs"], batch["data_samples"])
    return {name: tuple(value.shape[1:]) for name, value in recorder.outputs.items()}


class TermNeeds(NamedTuple):
    """What a run's terms read, asked of their declarations (``KDTerm.kinds``, ``reads_teacher_boxes``)."""

    response_kinds: list[str]  # head outputs the response terms read (heatmap: class heatmaps; reg: regression)
    features: bool  # feature layers are read (and paired) only for a term that distils features, or --pairs
    boxes: bool  # the teacher's boxes (featcache build --boxes)


def term_needs(terms: dict[str, dict], pairs_given: bool) -> TermNeeds:
    """What ``terms`` (name -> params) read; ``pairs_given``: --pairs names feature layers."""
    return TermNeeds(
        response_kinds=[kind for name in terms for kind in TERMS[name].kinds if kind != "feature"],
        features=pairs_given or any("feature" in TERMS[name].kinds for name in terms),
        boxes=any(TERMS[name].reads_teacher_boxes(params) for name, params in terms.items()))


@dataclass
class TeacherSide:
    """What the distiller knows of the teacher before training: its training data, grid, the modules and
    head outputs read, their shapes, layouts and codecs, its rows, and whether its boxes are read."""

    dataset: Any
    teacher_range: list[float]
    modules: list[str]
    shapes: dict[str, tuple[int, ...]]
    layouts: dict[str, str]
    codecs: dict[str, str]
    num_samples: int
    heatmaps: dict[str, tuple[str, list[int]]]
    regressions: dict[str, tuple[str, dict]]
    teacher_boxes: bool = False
    box_label_map: list[int] | None = None
    cache: Any = None  # the opened cache (None online)


def _teacher_boxes_missing(terms: dict[str, dict], cache: str) -> None:
    """A cache without teacher boxes: refused for a term that adds them to the GT, logged for a term that
    reads them and works without."""
    for name in terms:
        if TERMS[name].changes_gt:
            raise ConfigError(f"--kd {name} adds the teacher's boxes to the student's GT, and cache {cache} holds "
                              "none; build it with `featcache build ... --boxes` (a new --out, or --force)")
    for name, params in terms.items():
        if TERMS[name].reads_teacher_boxes(params) and TERMS[name].without_teacher_boxes:
            log.warning("the %s term %s: cache %s holds no teacher boxes (featcache build --boxes adds them)",
                        name, TERMS[name].without_teacher_boxes, cache)


def cache_side(cfg, options: TrainOptions, inner: dict, student, terms: dict[str, dict],
               needs: TermNeeds, unlabelled: dict | None = None) -> TeacherSide:
    """The teacher side from the cache: the layers read, the train pipeline rewired to carry them (and the
    teacher's boxes) and the train sampler to announce upcoming samples (``CacheReadaheadSampler``); the
    cache checked against the student's training data."""
    cache = open_cache(options.cache, storage_options=options.storage_options)
    dataset = models.build_dataset(inner)
    if unlabelled and unlabelled["pseudo_labels"] is not None and cache.manifest.boxes is None:
        raise ConfigError(f"--unlabelled-pseudo-labels makes the teacher's boxes the unlabelled scans' GT, and cache "
                          f"{options.cache} holds none; build it with `featcache build ... --boxes`")
    if needs.boxes and cache.manifest.boxes is None:
        _teacher_boxes_missing(terms, options.cache)
    teacher_boxes = needs.boxes and cache.manifest.boxes is not None
    # feature layers for feature terms; head outputs (build --head-outputs) for --kd heatmap or where --pairs
    # names them: nothing is read that no term uses
    paired = set((options.pairs or {}).values())
    heatmaps: dict[str, tuple[str, list[int]]] = {}
    regressions: dict[str, tuple[str, dict]] = {}
    if needs.response_kinds:
        cached = [TeacherOutput(layer.name, layer.meaning.get("kind"), tuple(layer.meaning.get("classes", ())),
                                tuple(layer.meaning.get("channels", ())), layer.meaning.get("head_type", ""))
                  for layer in cache.manifest.layers if layer.is_head_output]
        heatmaps, regressions = response_pairs(student, options.student_config, needs.response_kinds, cached,
                                               f"cache {options.cache}",
                                               teacher_head_type=config_head_type(cache.manifest.teacher_config))
        paired |= {t_layer for t_layer, _ in [*heatmaps.values(), *regressions.values()]}
    layers = [layer for layer in cache.manifest.layers
              if layer.name in paired or (needs.features and not layer.is_head_output)]
    names = [layer.name for layer in layers]
    boxes_step = (dict(classes=list(dataset.metainfo["classes"]),
                       point_cloud_range=[float(v) for v in cfg.point_cloud_range]) if teacher_boxes else None)
    inner["pipeline"] = _replace_pack(list(inner["pipeline"]), options.cache, names, options,
                                      dataset_data_root(dataset), boxes_step)
    cfg.train_dataloader.sampler = dict(type="CacheReadaheadSampler", sampler=cfg.train_dataloader.sampler,
                                        cache=options.cache, layers=names, storage_options=options.storage_options)
    teacher_range = bev_range(cache_point_cloud_range(cache.manifest), f"cache {options.cache}")
    modules = list(dict.fromkeys(layer.module for layer in layers))
    keys = dataset_keys(dataset)
    check_covered(cache, keys, f"{len(keys)} training samples of {options.student_config}",
                  "build the cache from the same infos (featcache build --split ...)")
    check_sources(cache, dataset)  # same keys, same scans: never another scan's targets
    if unlabelled:  # after the pipeline packs cached targets: the unlabelled scans' pipeline is a copy of it
        add_unlabelled(cfg, inner, dataset, unlabelled, options.cache, names, options.storage_options, terms,
                       teacher_boxes)
    return TeacherSide(dataset=dataset, teacher_range=teacher_range, modules=modules,
                       shapes={layer.name: layer.shape for layer in layers},
                       layouts=cache_layouts(cache.manifest, layers, options.cache),
                       codecs={layer.name: layer.codec.name for layer in layers},
                       num_samples=cache.manifest.num_samples, heatmaps=heatmaps, regressions=regressions,
                       teacher_boxes=teacher_boxes, cache=cache)


def online_side(options: TrainOptions, inner: dict, student, needs: TermNeeds) -> TeacherSide:
    """The teacher side of an online teacher (comparisons only): its shapes, head outputs and layouts from
    a probe on the first training sample."""
    teacher_cfg = models.load_config(options.online_teacher[0], options.teacher_cfg_options)
    teacher_range = bev_range(teacher_cfg.get("point_cloud_range", []), options.online_teacher[0])
    modules = list(models.MVX_LAYERS) if needs.features else []  # what a build caches of an MVX-style teacher
    dataset = models.build_dataset(inner)
    shapes, outputs, layouts = _probe_teacher_shapes(options, teacher_cfg, dataset, modules, needs.response_kinds,
                                                     teacher_range)
    heatmaps: dict[str, tuple[str, list[int]]] = {}
    regressions: dict[str, tuple[str, dict]] = {}
    if needs.response_kinds:
        heatmaps, regressions = response_pairs(student, options.student_config, needs.response_kinds, outputs,
                                               f"online teacher {options.online_teacher[0]}")
    side = TeacherSide(dataset=dataset, teacher_range=teacher_range, modules=modules, shapes=shapes,
                       layouts=layouts, codecs={}, num_samples=len(dataset), heatmaps=heatmaps,
                       regressions=regressions)
    if needs.boxes:  # the teacher's predictions on the augmented batch, labels named as the student's
        teacher_classes = teacher_class_names(teacher_cfg, options.online_teacher[0])
        student_classes = list(dataset.metainfo["classes"])
        side.teacher_boxes = True
        side.box_label_map = [student_classes.index(name) if name in student_classes else -1
                              for name in teacher_classes]
    return side


def layer_pairs(options: TrainOptions, terms: dict[str, dict], side: TeacherSide,
                student_shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Student layer -> teacher layer: --pairs, else the feature layers of the same name; then the
    response pairs. Every pair names a layer on both sides."""
    feature_pairs = options.pairs or {name: name for name in student_shapes if name in side.shapes
                                      and name not in side.heatmaps and name not in side.regressions}
    pairs = {**feature_pairs, **{s_layer: t_layer for s_layer, (t_layer, _) in [*side.heatmaps.items(),
                                                                                 *side.regressions.items()]}}
    if not pairs and any(TERMS[name].kinds for name in terms):  # label alone reads no layer
        raise ConfigError(f"no student layer matches a cached layer by name (student: {sorted(student_shapes)}, "
                          f"cache: {sorted(side.shapes)}); pass --pairs student_layer=cache_layer,...")
    for s_layer, t_layer in pairs.items():
        if s_layer not in student_shapes or t_layer not in side.shapes:
            unknown = ([f"the student has no layer {s_layer!r} (its layers: {sorted(student_shapes)})"]
                       if s_layer not in student_shapes else []) + \
                      ([f"the cache has no layer {t_layer!r} (its layers: {sorted(side.shapes)})"]
                       if t_layer not in side.shapes else [])
            raise ConfigError(f"--pairs {s_layer}={t_layer}: {'; '.join(unknown)}")
    return pairs


def log_pairs(pairs: dict[str, str], side: TeacherSide, student_range: Sequence[float],
              student_shapes: dict[str, tuple[int, ...]]) -> None:
    """One log line per grid and per pair: shapes, layout, cell sizes, a heatmap's channel map."""
    teacher_range = side.teacher_range
    log.info("BEV grids: student %s, teacher %s (x_min, y_min, x_max, y_max, metres)", student_range, teacher_range)
    for s_layer, t_layer in pairs.items():
        t_shape = side.shapes[t_layer]
        t_layout = BevLayout.parse(side.layouts.get(t_layer, CANONICAL.name))
        ny, nx = t_layout.canonical_hw(t_shape[-2:])
        log.info("pair %s (%s, rows = y) <- %s (%s, layout %s: %d x-cells of %.3f m, %d y-cells of %.3f m)%s",
                 s_layer, "x".join(map(str, student_shapes[s_layer])), t_layer, "x".join(map(str, t_shape)),
                 t_layout.name, nx, (teacher_range[2] - teacher_range[0]) / nx, ny,
                 (teacher_range[3] - teacher_range[1]) / ny,
                 f"; student heatmap channel -> teacher channel {side.heatmaps[s_layer][1]} (-1: the teacher lacks "
                 "the class)" if s_layer in side.heatmaps else "")


def check_alignment(options: TrainOptions, pairs: dict[str, str], side: TeacherSide, student_range: Sequence[float],
                    student_shapes: dict[str, tuple[int, ...]]) -> None:
    """The teacher's cached maps as the trainer will read them, against the scans, before training."""
    from trainer import alignment_check

    # regression outputs are read at box centres only, and a trained head's dense ones are not active where the
    # points are: their layout is their head's (the cache's record), checked through the heatmaps and features
    checked = {s_layer: t_layer for s_layer, t_layer in pairs.items() if s_layer not in side.regressions}
    samples = alignment_check.training_samples(side.dataset, side.cache, dataset_keys(side.dataset),
                                               sorted(set(checked.values())))
    alignment_check.check(alignment_check.measure(checked, side.layouts, samples, side.teacher_range, student_range,
                                                  student_shapes),
                          f"cache {options.cache} and student {options.student_config}", options.force_alignment)


def distiller_model_cfg(cfg, options: TrainOptions) -> dict:
    """``CacheDistiller`` around ``cfg.model``; with a cache, rewires the train pipeline to carry cached
    targets and the train sampler to announce upcoming samples to the cache (``cache_side``)."""
    if not options.cache and not options.online_teacher:
        raise ConfigError("featcache train needs --cache (or --online-teacher CONFIG CKPT for comparisons, "
                          "or --no-distill for the student alone)")
    terms, warmup = resolve_terms(cfg, options)
    inner = models.unwrap_dataset_cfg(cfg.train_dataloader.dataset)
    models.init_mmdet3d_scope()
    student = models.build_model(cfg)
    needs = term_needs(terms, bool(options.pairs))
    unlabelled = resolve_unlabelled(cfg, options)
    pseudo_labels = unlabelled["pseudo_labels"] if unlabelled else None
    if pseudo_labels is not None:  # the hard pseudo-label baseline reads the teacher's boxes
        needs = needs._replace(boxes=True)
    student_range = student_bev_range(cfg, options.student_config)
    side = (cache_side(cfg, options, inner, student, terms, needs, unlabelled) if options.cache
            else online_side(options, inner, student, needs))
    student_shapes = _probe_student(student, side.dataset,
                                    list(dict.fromkeys([*side.modules, *side.heatmaps, *side.regressions])))
    pairs = layer_pairs(options, terms, side, student_shapes)
    log_pairs(pairs, side, student_range, student_shapes)
    if options.cache:
        check_alignment(options, pairs, side, student_range, student_shapes)
    return dict(
        type="CacheDistiller", student=copy.deepcopy(cfg.model), pairs=pairs,
        student_shapes={k: list(v) for k, v in student_shapes.items() if k in pairs},
        teacher_shapes={k: list(v) for k, v in side.shapes.items() if k in pairs.values()},
        student_range=student_range, teacher_range=side.teacher_range, terms=terms, warmup_iters=warmup,
        num_samples=side.num_samples,
        target_codecs={k: v for k, v in side.codecs.items() if k in pairs.values()},
        heatmap_pairs={s_layer: channels for s_layer, (_, channels) in side.heatmaps.items()},
        regression_pairs={s_layer: spec for s_layer, (_, spec) in side.regressions.items()},
        teacher_boxes=side.teacher_boxes, box_label_map=side.box_label_map, pseudo_label_score=pseudo_labels,
        teacher_layouts={k: v for k, v in side.layouts.items() if k in pairs.values()},
        online_teacher=(dict(config=options.online_teacher[0], checkpoint=options.online_teacher[1],
                             cfg_options=options.teacher_cfg_options) if options.online_teacher else None))


def _probe_teacher_shapes(options: TrainOptions, teacher_cfg, dataset, modules: Sequence[str], kinds: Sequence[str],
                          teacher_range: Sequence[float]
                          ) -> tuple[dict[str, tuple[int, ...]], list["TeacherOutput"], dict[str, str]]:
    """The online teacher's (``teacher_cfg``, loaded once by ``online_side``) per-sample output shapes of ``modules``
    and of its head outputs of ``kinds``,
    those head outputs described, and each map's BEV layout, measured as ``featcache build`` measures it
    (``featcache.layout.decide_layouts``: the sample's points against the maps)."""
    from mmengine.dataset import pseudo_collate

    from featcache.layout import decide_layouts
    from featcache.teacher.recording import record_teacher

    teacher = models.build_model(teacher_cfg, options.online_teacher[1]).eval()
    outputs = online_head_outputs(teacher, teacher_cfg, kinds, options.online_teacher[0]) if kinds else []
    batch = pseudo_collate([dataset[0]])
    recorded = record_teacher(teacher, batch, list(modules) + [out.layer for out in outputs])
    points = batch["inputs"]["points"][0]
    found, lines, warnings = decide_layouts({name: value[0].float().cpu().numpy() for name, value in recorded.items()},
                                            np.asarray(points)[:, :2], teacher_range,
                                            where=" of the first training sample")
    for line in lines:
        logging.getLogger("trainer.train").info("online teacher BEV layout: %s", line)
    for line in warnings:
        logging.getLogger("trainer.train").warning("online teacher BEV layout: %s", line)
    layouts = {name: BevLayout.from_dict(layout).name for name, layout in found.items()}
    return {name: tuple(value.shape[1:]) for name, value in recorded.items()}, outputs, layouts
