"""``featcache train``: turn a student config plus a cache into an mmengine Runner and train.

What is added to the user's config: the model becomes a ``CacheDistiller`` around it (heads
sized from a probe of the student and the cache manifest), the train pipeline's
``Pack3DDetInputs`` becomes ``PackDetInputsWithCache``, the train sampler is wrapped in
``CacheReadaheadSampler`` (same order; cold reads announced ahead), and a work dir. Everything else (logs,
checkpoints, ``--resume``, schedulers, TensorBoard, DDP via ``torchrun``) is mmengine's Runner.
Mismatches between the cache and the student's data are errors before any training step.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from featcache import format, open_cache
from featcache.teacher import models
from featcache.teacher.checkpoint import openmmlab_safe_globals
from featcache.errors import CacheMismatchError, ConfigError
from featcache.layout import CANONICAL, BevLayout
from featcache.teacher.recording import LayerRecorder

TRAINER_IMPORTS = ["trainer.distiller", "trainer.transforms", "trainer.samplers"]


@dataclass
class TrainOptions:
    """What ``featcache train`` was asked for. Distillation terms come from ``kd`` (``--kd``), else the
    student config's ``distill = dict(terms=..., warmup_iters=...)``, else ``crd=1``."""

    student_config: str
    cache: str | None
    work_dir: str | None = None
    kd: dict[str, float] | None = None  # term -> weight (--kd infonce=1,pkd=5)
    kd_warmup: int | None = None  # iterations of linear weight warm-up (None: the config's, else 0)
    loss: str | None = None  # deprecated (--loss X): same as kd={X: alpha}
    alpha: float | None = None  # deprecated (--alpha-crd): the weight of --loss's term
    temperature: float | None = None  # for the terms that take one (crd, infonce); None: the term's 0.07
    feat_dim: int | None = None  # embedding size of the projection heads (crd, infonce); None: 128
    pairs: dict[str, str] | None = None  # student layer -> cache layer; default: same names
    resume: bool = False
    cfg_options: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] | None = None
    skip_corrupt: bool = False
    online_teacher: tuple[str, str] | None = None  # (config, checkpoint): targets computed live
    teacher_cfg_options: dict[str, Any] = field(default_factory=dict)
    no_distill: bool = False  # the student alone (no-KD baseline, or training a teacher); no cache needed
    init_from_teacher: tuple[str, str] | None = None  # (config, checkpoint): start from its sliced weights
    force_alignment: bool = False  # train even where the pre-training alignment check refuses a pair


def bev_range(point_cloud_range: Sequence[float], where: str) -> list[float]:
    if len(point_cloud_range) != 6:
        raise ConfigError(f"{where} has no point_cloud_range [x0, y0, z0, x1, y1, z1] to place its BEV grid")
    return [float(point_cloud_range[i]) for i in (0, 1, 3, 4)]


_RANGE_KEYS = ("point_cloud_range", "pc_range")


def _ranges_in(node: Any, path: str) -> dict[str, list[float]]:
    """Every ``point_cloud_range`` / ``pc_range`` entry under a config node, by dotted path."""
    found: dict[str, list[float]] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key in _RANGE_KEYS and isinstance(value, (list, tuple)) and all(
                    isinstance(v, (int, float)) for v in value):
                found[where] = [float(v) for v in value]
            else:
                found.update(_ranges_in(value, where))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            found.update(_ranges_in(value, f"{path}[{index}]"))
    return found


def student_bev_range(cfg, where: str) -> list[float]:
    """The student's BEV extent [x_min, y_min, x_max, y_max], from its model: the voxel layer's
    ``point_cloud_range`` (else the first 6-number range in the model). Every other range the model or the
    config's top-level ``point_cloud_range`` states (the voxel encoder's, the head's train/test and coder
    ``pc_range``) must agree with it: a student whose parts disagree is refused by name, since the trainer
    would place the teacher's targets on a grid the student does not have."""
    model = cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model)
    ranges = _ranges_in(model, "model")
    voxel = [path for path in ranges if path.endswith("voxel_layer.point_cloud_range") and len(ranges[path]) == 6]
    full = voxel or [path for path, value in ranges.items() if len(value) == 6]
    if not full:
        return bev_range(cfg.get("point_cloud_range", []), where)
    source = full[0]
    extent = bev_range(ranges[source], f"{where} ({source})")
    stated = dict(ranges)
    if cfg.get("point_cloud_range") is not None:
        stated["point_cloud_range (top level)"] = [float(v) for v in cfg.point_cloud_range]
    disagree = []
    for path, value in stated.items():
        mine = extent if len(value) != 2 else extent[:2]
        theirs = bev_range(value, path) if len(value) == 6 else value if len(value) in (2, 4) else None
        if theirs is not None and any(abs(a - b) > 1e-4 for a, b in zip(mine, theirs)):
            disagree.append(f"{path} = {value}")
    if disagree:
        raise ConfigError(f"{where}: the student's BEV grid is placed by {source} = {ranges[source]}, but "
                          f"{'; '.join(disagree)} disagree(s) with it; make them one range (a --cfg-options "
                          "override of point_cloud_range does not reach the model's copies: override those too)")
    return extent


def _cache_point_cloud_range(manifest) -> list[float]:
    """The teacher's point_cloud_range as recorded by the build (or read from its config text)."""
    if manifest.extra.get("point_cloud_range"):
        return manifest.extra["point_cloud_range"]
    from mmengine.config import Config

    return list(Config.fromstring(manifest.teacher_config, ".py").get("point_cloud_range", []))


def resolve_terms(cfg, options: TrainOptions) -> tuple[dict[str, dict], int]:
    """The distillation terms (name -> dict(weight=..., **params)) and warm-up iterations of a run.

    ``--kd`` names the terms and their weights; a term's other parameters come from the student
    config's ``distill.terms`` entry of the same name, ``--temperature`` / ``--feat-dim`` override
    them where the term takes them. The deprecated ``--loss X --alpha-crd A`` means ``--kd X=A``.
    """
    import inspect

    from trainer.terms import TERMS

    configured = dict(cfg.get("distill") or {})
    unknown = sorted(set(configured) - {"terms", "warmup_iters"})
    if unknown:
        raise ConfigError(f"{options.student_config}: distill has no setting {', '.join(unknown)} "
                          "(it takes terms=dict(name=weight or dict(weight=..., ...)) and warmup_iters=N)")
    config_terms = {name: (dict(value) if isinstance(value, dict) else {"weight": float(value)})
                    for name, value in dict(configured.get("terms") or {}).items()}
    kd = dict(options.kd) if options.kd else None
    if options.loss is not None or (options.alpha is not None and kd is None):
        if kd is not None:
            raise ConfigError("--loss/--alpha-crd are replaced by --kd TERM=WEIGHT[,TERM=WEIGHT...]; give --kd only")
        loss = options.loss or "crd"  # --alpha-crd alone weighted the old default, crd
        logging.getLogger("trainer.train").warning(
            "--loss %s --alpha-crd %s is deprecated; use --kd %s=%s", loss, options.alpha, loss,
            1.0 if options.alpha is None else options.alpha)
        kd = {loss: 1.0 if options.alpha is None else float(options.alpha)}
    if kd is not None:
        terms = {name: {**config_terms.get(name, {}), "weight": float(weight)} for name, weight in kd.items()}
    else:
        terms = config_terms or {"crd": {"weight": 1.0}}
    for name, params in terms.items():
        if name not in TERMS:
            raise ConfigError(f"distillation term {name!r} (from {'--kd' if kd else options.student_config}) does "
                              f"not exist; choose from {', '.join(sorted(TERMS))}")
        accepted = inspect.signature(TERMS[name].__init__).parameters
        for option, value in (("temperature", options.temperature), ("feat_dim", options.feat_dim)):
            if value is not None and option in accepted:
                params[option] = value
    warmup = options.kd_warmup if options.kd_warmup is not None else int(configured.get("warmup_iters", 0))
    if warmup < 0:
        raise ConfigError(f"distillation warm-up must be >= 0 iterations, got {warmup}")
    return terms, warmup


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


def _check_cache_covers(dataset, cache, config: str) -> None:
    keys = models.dataset_keys(dataset)
    missing = [key for key in keys if key not in cache]
    if missing:
        raise CacheMismatchError(
            f"{len(missing)} of {len(keys)} training samples of {config} are not in cache {cache.location} "
            f"(dataset id {cache.manifest.dataset_id[:12]}..., split {cache.manifest.split!r}), e.g. "
            f"{', '.join(missing[:5])}; build the cache from the same infos (featcache build --split ...)")
    status = cache.status()
    incomplete = [key for key in keys if status[cache.row_of(key)] != format.STATUS_COMPLETE]
    if incomplete:
        raise CacheMismatchError(f"{len(incomplete)} training samples are not complete in {cache.location}, e.g. "
                                 f"{', '.join(incomplete[:5])}; finish it with `featcache build` (it resumes) "
                                 "or check `featcache verify`")


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


def build_runner_config(options: TrainOptions):
    """The full mmengine config ``featcache train`` runs (also what lands in work_dir)."""
    cfg = models.load_config(options.student_config, options.cfg_options)
    models.init_mmdet3d_scope()
    import trainer.distiller  # noqa: F401  (registers CacheDistiller / PackDetInputsWithCache)
    import trainer.samplers  # noqa: F401  (registers CacheReadaheadSampler)

    if not options.no_distill:
        cfg.model = _distiller_model_cfg(cfg, options)
    imports = list(cfg.get("custom_imports", {}).get("imports", []))
    cfg.custom_imports = dict(imports=list(dict.fromkeys(imports + TRAINER_IMPORTS)), allow_failed_imports=False)
    cfg.work_dir = options.work_dir or cfg.get("work_dir") or os.path.join(
        "work_dirs", os.path.splitext(os.path.basename(options.student_config))[0])
    cfg.resume = options.resume
    if options.init_from_teacher:
        cfg.init_from_teacher = dict(config=options.init_from_teacher[0], checkpoint=options.init_from_teacher[1])
    visualizer = cfg.get("visualizer")
    if visualizer is not None:  # TensorBoard scalars next to mmengine's own logs
        backends = list(visualizer.get("vis_backends") or [dict(type="LocalVisBackend")])
        if not any(backend.get("type") == "TensorboardVisBackend" for backend in backends):
            backends.append(dict(type="TensorboardVisBackend"))
        visualizer["vis_backends"] = backends
    cfg.launcher = "pytorch" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"
    if cfg.launcher == "pytorch" and not torch.cuda.is_available():
        # mmengine's launcher assumes CUDA (set_device, device_ids); on CPU: gloo, no device ids
        cfg.env_cfg = dict(cfg.get("env_cfg", {}), dist_cfg=dict(backend="gloo"))
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
    return cfg


def _distiller_model_cfg(cfg, options: TrainOptions) -> dict:
    """``CacheDistiller`` around ``cfg.model``; rewires the train pipeline to carry cached targets and
    the train sampler to announce upcoming samples to the cache (``CacheReadaheadSampler``)."""
    if not options.cache and not options.online_teacher:
        raise ConfigError("featcache train needs --cache (or --online-teacher CONFIG CKPT for comparisons, "
                          "or --no-distill for the student alone)")
    terms, warmup = resolve_terms(cfg, options)
    inner = models.unwrap_dataset_cfg(cfg.train_dataloader.dataset)
    models.init_mmdet3d_scope()
    student = models.build_model(cfg)
    from trainer.terms import TERMS

    # head outputs the response terms read (heatmap: class heatmaps; reg: the regression outputs)
    response_kinds = [kind for name in terms for kind in TERMS[name].kinds if kind != "feature"]
    # feature layers are read (and paired) only for a term that distils features, or when --pairs names them
    wants_features = bool(options.pairs) or any("feature" in TERMS[name].kinds for name in terms)
    # teacher boxes: label KD needs them; the reg term reads the teacher's peaks from them when there are any
    wants_boxes = "label" in terms or ("reg" in terms and float(terms["reg"].get("peak_score", 0.5)) <= 1)
    teacher_boxes, box_label_map = False, None
    heatmaps: dict[str, tuple[str, list[int]]] = {}
    regressions: dict[str, tuple[str, dict]] = {}
    student_range = student_bev_range(cfg, options.student_config)
    if options.cache:
        cache = open_cache(options.cache, storage_options=options.storage_options)
        dataset = models.build_dataset(inner)
        if wants_boxes and cache.manifest.boxes is None:
            if "label" in terms:
                raise ConfigError(f"--kd label adds the teacher's boxes to the student's GT, and cache {options.cache} "
                                  "holds none; build it with `featcache build ... --boxes` (a new --out, or --force)")
            logging.getLogger("trainer.train").warning(
                "the reg term reads GT centres only: cache %s holds no teacher boxes to find the teacher's peaks "
                "(featcache build --boxes adds them)", options.cache)
        teacher_boxes = wants_boxes and cache.manifest.boxes is not None
        # feature layers for feature terms; head outputs (build --head-outputs) for --kd heatmap or where --pairs
        # names them: nothing is read that no term uses
        paired = set((options.pairs or {}).values())
        if response_kinds:
            cached = [TeacherOutput(layer.name, layer.meaning.get("kind"), tuple(layer.meaning.get("classes", ())),
                                    tuple(layer.meaning.get("channels", ())), layer.meaning.get("head_type", ""))
                      for layer in cache.manifest.layers if layer.is_head_output]
            heatmaps, regressions = response_pairs(student, options.student_config, response_kinds, cached,
                                                   f"cache {options.cache}",
                                                   teacher_head_type=_config_head_type(cache.manifest.teacher_config))
            paired |= {t_layer for t_layer, _ in [*heatmaps.values(), *regressions.values()]}
        layers = [layer for layer in cache.manifest.layers
                  if layer.name in paired or (wants_features and not layer.is_head_output)]
        names = [layer.name for layer in layers]
        boxes_step = (dict(classes=list(dataset.metainfo["classes"]),
                           point_cloud_range=[float(v) for v in cfg.point_cloud_range]) if teacher_boxes else None)
        inner["pipeline"] = _replace_pack(list(inner["pipeline"]), options.cache, names, options,
                                          models.dataset_data_root(dataset), boxes_step)
        cfg.train_dataloader.sampler = dict(type="CacheReadaheadSampler", sampler=cfg.train_dataloader.sampler,
                                            cache=options.cache, layers=names, storage_options=options.storage_options)
        teacher_range = bev_range(_cache_point_cloud_range(cache.manifest), f"cache {options.cache}")
        modules = list(dict.fromkeys(layer.module for layer in layers))
        _check_cache_covers(dataset, cache, options.student_config)
        models.check_sources(cache, dataset)  # same keys, same scans: never another scan's targets
        teacher_shapes = {layer.name: layer.shape for layer in layers}
        teacher_layouts = cache_layouts(cache.manifest, layers, options.cache)
        target_codecs = {layer.name: layer.codec.name for layer in layers}
        num_samples = cache.manifest.num_samples
    else:  # online only: the teacher's shapes come from a probe of the teacher
        teacher_cfg = models.load_config(options.online_teacher[0], options.teacher_cfg_options)
        teacher_range = bev_range(teacher_cfg.get("point_cloud_range", []), options.online_teacher[0])
        modules = ["pts_middle_encoder", "pts_backbone", "pts_neck"] if wants_features else []
        dataset = models.build_dataset(inner)
        teacher_shapes, teacher_outputs, teacher_layouts = _probe_teacher_shapes(options, dataset, modules,
                                                                                 response_kinds, teacher_range)
        if response_kinds:
            heatmaps, regressions = response_pairs(student, options.student_config, response_kinds, teacher_outputs,
                                                   f"online teacher {options.online_teacher[0]}")
        target_codecs = {}
        num_samples = len(dataset)
        if wants_boxes:  # the teacher's predictions on the augmented batch, labels named as the student's
            teacher_classes = teacher_class_names(teacher_cfg, options.online_teacher[0])
            student_classes = list(dataset.metainfo["classes"])
            teacher_boxes = True
            box_label_map = [student_classes.index(name) if name in student_classes else -1 for name in teacher_classes]
    student_shapes = _probe_student(student, dataset, list(dict.fromkeys([*modules, *heatmaps, *regressions])))
    if "crd" in terms and num_samples < 2:
        raise ConfigError(f"the crd term contrasts samples against each other and needs at least 2 cached samples; "
                          f"{options.cache or options.student_config} has {num_samples}. Use more samples, or a "
                          "term that works per sample: --kd infonce=1 (or pkd=1, mse=1)")
    feature_pairs = options.pairs or {name: name for name in student_shapes if name in teacher_shapes
                                      and name not in heatmaps and name not in regressions}
    pairs = {**feature_pairs, **{s_layer: t_layer for s_layer, (t_layer, _) in [*heatmaps.items(),
                                                                                 *regressions.items()]}}
    if not pairs and any(TERMS[name].kinds for name in terms):  # label alone reads no layer
        raise ConfigError(f"no student layer matches a cached layer by name (student: {sorted(student_shapes)}, "
                          f"cache: {sorted(teacher_shapes)}); pass --pairs student_layer=cache_layer,...")
    for s_layer, t_layer in pairs.items():
        if s_layer not in student_shapes or t_layer not in teacher_shapes:
            unknown = ([f"the student has no layer {s_layer!r} (its layers: {sorted(student_shapes)})"]
                       if s_layer not in student_shapes else []) + \
                      ([f"the cache has no layer {t_layer!r} (its layers: {sorted(teacher_shapes)})"]
                       if t_layer not in teacher_shapes else [])
            raise ConfigError(f"--pairs {s_layer}={t_layer}: {'; '.join(unknown)}")
    log = logging.getLogger("trainer.train")
    log.info("BEV grids: student %s, teacher %s (x_min, y_min, x_max, y_max, metres)", student_range, teacher_range)
    for s_layer, t_layer in pairs.items():
        t_shape = teacher_shapes[t_layer]
        t_layout = BevLayout.parse(teacher_layouts.get(t_layer, CANONICAL.name))
        ny, nx = t_layout.canonical_hw(t_shape[-2:])
        log.info("pair %s (%s, rows = y) <- %s (%s, layout %s: %d x-cells of %.3f m, %d y-cells of %.3f m)%s",
                 s_layer, "x".join(map(str, student_shapes[s_layer])), t_layer, "x".join(map(str, t_shape)),
                 t_layout.name, nx, (teacher_range[2] - teacher_range[0]) / nx, ny,
                 (teacher_range[3] - teacher_range[1]) / ny,
                 f"; student heatmap channel -> teacher channel {heatmaps[s_layer][1]} (-1: the teacher lacks the class)"
                 if s_layer in heatmaps else "")
    if options.cache:  # the teacher's maps as the trainer will read them, against the scans, before training
        from trainer import alignment_check

        # regression outputs are read at box centres only, and a trained head's dense ones are not active where the
        # points are: their layout is their head's (the cache's record), checked through the heatmaps and features
        checked = {s_layer: t_layer for s_layer, t_layer in pairs.items() if s_layer not in regressions}
        samples = alignment_check.training_samples(dataset, cache, models.dataset_keys(dataset),
                                                   sorted(set(checked.values())))
        alignment_check.check(alignment_check.measure(checked, teacher_layouts, samples, teacher_range, student_range,
                                                      student_shapes),
                              f"cache {options.cache} and student {options.student_config}", options.force_alignment)
    return dict(
        type="CacheDistiller", student=copy.deepcopy(cfg.model), pairs=pairs,
        student_shapes={k: list(v) for k, v in student_shapes.items() if k in pairs},
        teacher_shapes={k: list(v) for k, v in teacher_shapes.items() if k in pairs.values()},
        student_range=student_range, teacher_range=teacher_range, terms=terms, warmup_iters=warmup,
        num_samples=num_samples,
        target_codecs={k: v for k, v in target_codecs.items() if k in pairs.values()},
        heatmap_pairs={s_layer: channels for s_layer, (_, channels) in heatmaps.items()},
        regression_pairs={s_layer: spec for s_layer, (_, spec) in regressions.items()},
        teacher_boxes=teacher_boxes, box_label_map=box_label_map,
        teacher_layouts={k: v for k, v in teacher_layouts.items() if k in pairs.values()},
        online_teacher=(dict(config=options.online_teacher[0], checkpoint=options.online_teacher[1],
                             cfg_options=options.teacher_cfg_options) if options.online_teacher else None))


def _probe_teacher_shapes(options: TrainOptions, dataset, modules: Sequence[str], kinds: Sequence[str],
                          teacher_range: Sequence[float]
                          ) -> tuple[dict[str, tuple[int, ...]], list["TeacherOutput"], dict[str, str]]:
    """The online teacher's per-sample output shapes of ``modules`` and of its head outputs of ``kinds``,
    those head outputs described, and each map's BEV layout, measured as ``featcache build`` measures it
    (``featcache.layout.decide_layouts``: the sample's points against the maps)."""
    from mmengine.dataset import pseudo_collate

    from featcache.layout import decide_layouts
    from featcache.teacher.recording import record_teacher

    teacher_cfg = models.load_config(options.online_teacher[0], options.teacher_cfg_options)
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


def cache_layouts(manifest, layers: Sequence[Any], where: str) -> dict[str, str]:
    """Each read layer's BEV layout name as the cache records it. A cache written before layouts were recorded
    is read as rows = y (as featcache always read it), except from a teacher whose maps are known to be laid
    out otherwise (BEVFusion's): that cache is refused."""
    if any(layer.layout_recorded for layer in manifest.layers):
        return {layer.name: layer.bev_layout.name for layer in layers}
    if "BEVFusion" in manifest.teacher_config:
        raise CacheMismatchError(
            f"cache {where} was built by a BEVFusion teacher before featcache recorded BEV layouts; BEVFusion lays "
            "its maps out rows = x, and this cache does not say which it holds. Rebuild it with this featcache "
            "(featcache build ... --force), which measures and records each layer's layout")
    logging.getLogger("trainer.train").warning(
        "cache %s records no BEV layout (built before featcache recorded them): its maps are read as rows = y, "
        "columns = x (mmdet3d's); rebuild it to have the layout measured and recorded", where)
    return {layer.name: CANONICAL.name for layer in layers}


def online_head_outputs(teacher, teacher_cfg, kinds: Sequence[str], where: str) -> list["TeacherOutput"]:
    """An online teacher's head outputs of ``kinds``, described as a cache's manifest describes them. A
    TransFusionHead (BEVFusion) names no classes itself: its heatmap's channels are its config's
    classes (``teacher_class_names``), as ``featcache build`` records them."""
    from featcache.teacher.heads import find_head, head_outputs, is_transfusion_head

    _, head = find_head(teacher)
    classes = teacher_class_names(teacher_cfg, where) if is_transfusion_head(head) else None
    if is_transfusion_head(head) and set(kinds) - {"heatmap"}:
        raise ConfigError(transfusion_reg_advice(f"online teacher {where}", type(head).__name__))
    return [TeacherOutput(output.layer, output.kind, output.classes, output.channels, output.head_type)
            for output in head_outputs(teacher, list(dict.fromkeys(kinds)), classes)]


def teacher_class_names(teacher_cfg, where: str) -> list[str]:
    """The class of each of a teacher's prediction labels: its config's ``class_names``, else its train
    dataset's ``metainfo.classes`` (what ``featcache build --boxes`` records)."""
    classes = teacher_cfg.get("class_names")
    if not classes:
        classes = (models.unwrap_dataset_cfg(teacher_cfg.train_dataloader.dataset).get("metainfo") or {}).get("classes")
    if not classes:
        raise ConfigError(f"teacher config {where} names no class_names (nor train dataset metainfo.classes): its "
                          "boxes' labels could not be matched to the student's classes")
    return list(classes)


class TeacherOutput(NamedTuple):
    """A teacher head output a response term can read: its layer, kind (``heatmap``, ``reg``...), task
    classes and what each channel holds (``featcache.teacher.heads.HeadOutput``, or a manifest's ``meaning``)."""

    layer: str
    kind: str
    classes: tuple[str, ...]
    channels: tuple[str, ...]
    head_type: str = ""  # the teacher head's class name (manifest meaning.head_type), for messages


def transfusion_reg_advice(where: str, head_type: str = "TransFusionHead") -> str:
    """What to do instead of --kd reg when the teacher's head regresses boxes per object query."""
    return (f"--kd reg distils a CenterHead's dense regression outputs (reg, height, dim, rot, vel), and the head of "
            f"{where} is a {head_type} (BEVFusion), which regresses boxes per object query and has none: "
            "`featcache build --head-outputs all` refuses it. What distils a TransFusionHead teacher's responses: "
            "--kd heatmap (its class heatmap, from a cache built with --head-outputs heatmap) and --kd label (its "
            "decoded boxes, from a cache built with --boxes), e.g. --kd heatmap=10,label=1 on a cache built with "
            "--head-outputs heatmap --boxes")


def match_by_class(student: Sequence[tuple[str, Sequence[str]]], teacher: Sequence[tuple[str, Sequence[str]]],
                   where: str) -> dict[str, tuple[str, list[int]]]:
    """Pair each student head output (with its task's classes) with the teacher output of the same kind
    that holds the same classes, matched by name, not position: a 10-class one-task teacher distils a
    6-class student of four tasks. Returns student layer -> (teacher layer, per student channel the
    teacher channel, -1 for a class the teacher lacks); a student task whose classes the teacher has
    in none of its layers is left out, one whose classes are split over several is an error."""
    pairs: dict[str, tuple[str, list[int]]] = {}
    for s_layer, classes in student:
        found = {t_layer: [list(t_classes).index(name) if name in t_classes else -1 for name in classes]
                 for t_layer, t_classes in teacher if set(classes) & set(t_classes)}
        if len(found) > 1:
            raise ConfigError(f"a response term compares one student head output with one teacher output, but the classes "
                              f"{list(classes)} of student layer {s_layer} are split over teacher layers {sorted(found)} "
                              f"({where}); give the student tasks that group classes as the teacher's do")
        if found:
            (t_layer, channels), = found.items()
            pairs[s_layer] = (t_layer, channels)
    if not pairs:
        raise ConfigError(f"the response terms found no student class among the teacher's head classes ({where}: "
                          f"{sorted({name for _, names in teacher for name in names})}; student: "
                          f"{sorted({name for _, names in student for name in names})})")
    return pairs


def _config_head_type(config_text: str | None) -> str:
    """"TransFusionHead" when a cache's recorded teacher config (its text) names one, else "" (for messages:
    a cache without head outputs records no head type)."""
    import re

    return "TransFusionHead" if re.search(r"type\s*=\s*['\"]TransFusionHead['\"]", config_text or "") else ""


def response_pairs(student, config: str, kinds: Sequence[str], teacher: Sequence[TeacherOutput], where: str,
                   teacher_head_type: str = "") -> tuple[dict[str, tuple[str, list[int]]], dict[str, tuple[str, dict]]]:
    """The head-output pairs of the response terms, which read the head outputs of ``kinds`` (their
    ``KDTerm.kinds``): heatmaps (student layer -> (teacher layer, channel map)), regression outputs
    (student layer -> (teacher layer, dict(kind, labels, log_dims))), student tasks matched to teacher
    tasks by class name (``match_by_class``)."""
    from featcache.teacher.heads import head_outputs, find_head
    from trainer.response import REGRESSION_KINDS

    available = {out.kind for out in teacher}
    transfusion = [name for name in (*(out.head_type for out in teacher), teacher_head_type) if name == "TransFusionHead"]
    if transfusion and set(REGRESSION_KINDS) & set(kinds) and not available & set(REGRESSION_KINDS):
        raise ConfigError(transfusion_reg_advice(where, transfusion[0]))
    for wanted, what, option in ((["heatmap"], "class heatmaps", "--head-outputs heatmap"),
                                 (list(REGRESSION_KINDS), "regression outputs",
                                  "--head-outputs all (or reg,height,dim,rot,vel)")):
        if set(wanted) & set(kinds) and not available & set(wanted):
            raise ConfigError(f"--kd {'heatmap' if wanted == ['heatmap'] else 'reg'} distils the teacher's {what}, "
                              f"and {where} has none; build it with `featcache build ... {option}` (features "
                              "and head outputs in one pass)")
    kinds = [kind for kind in dict.fromkeys(kinds) if kind in available]  # a KITTI head has no vel
    try:
        outputs = head_outputs(student, kinds)
        _, head = find_head(student)
    except ConfigError as exc:
        raise ConfigError(f"the response terms distil CenterHead outputs; student {config}: {exc}") from exc
    flat_classes = [name for classes in head.class_names for name in classes]  # CenterHead's label order
    log_dims = bool(getattr(head, "norm_bbox", True))
    heatmaps, regressions = {}, {}
    for kind in kinds:
        matched = match_by_class([(out.layer, out.classes) for out in outputs if out.kind == kind],
                                 [(out.layer, out.classes) for out in teacher if out.kind == kind], where)
        for s_layer, (t_layer, channels) in matched.items():
            if kind == "heatmap":
                heatmaps[s_layer] = (t_layer, channels)
                continue
            if kind == "dim":
                teacher_log = next(out for out in teacher if out.layer == t_layer).channels[:1] == ("log_l",)
                if teacher_log != log_dims:
                    raise ConfigError(f"the reg term: teacher output {t_layer} holds {'log ' if teacher_log else ''}box "
                                      f"extents, student {config} predicts {'log ' if log_dims else ''}extents "
                                      "(CenterHead norm_bbox): distil heads with the same norm_bbox")
            classes = next(out.classes for out in outputs if out.layer == s_layer)
            labels = [flat_classes.index(name) for name, channel in zip(classes, channels) if channel >= 0]
            regressions[s_layer] = (t_layer, dict(kind=kind, labels=labels, log_dims=log_dims))
    return heatmaps, regressions


def _runner_class():
    from mmengine.runner import Runner

    class DistillRunner(Runner):
        """mmengine's Runner with :func:`featcache.teacher.models.init_weights` (the heatmap prior mmengine's
        recursive init misses); checkpoints still load or resume after it."""

        def _init_model_weights(self) -> None:
            from mmengine.dist import broadcast
            from mmengine.model import is_model_wrapper

            model = self.model.module if is_model_wrapper(self.model) else self.model
            models.init_weights(model)
            inherit = self.cfg.get("init_from_teacher")
            if inherit:  # before a resume or load_from, which then overwrite it
                from trainer.distiller import CacheDistiller
                from trainer.inherit import inherit_from_teacher

                detector = model.student if isinstance(model, CacheDistiller) else model
                self.logger.info(inherit_from_teacher(detector, inherit["config"], inherit["checkpoint"]).summary())
            for tensor in model.state_dict().values():  # every rank starts from rank 0's weights
                broadcast(tensor)

        def load_checkpoint(self, filename: str, *args: Any, **kwargs: Any):
            # mmengine loads non-strictly: a checkpoint of another model only logs one warning per
            # tensor (a hundred lines) and training goes on from random weights
            from mmengine.model import is_model_wrapper

            model = self.model.module if is_model_wrapper(self.model) else self.model
            check_checkpoint_fits(filename, model.state_dict())
            return super().load_checkpoint(filename, *args, **kwargs)

    return DistillRunner


def check_checkpoint_fits(filename: str, model_state: dict[str, torch.Tensor]) -> None:
    """Raise ConfigError when checkpoint ``filename`` (``load_from`` or ``--resume``) does not fit the
    model: tensors of other shapes (named, first few, and counted) or no tensor name in common."""
    from featcache.teacher.checkpoint import load_checkpoint_file, shape_mismatches

    state = load_checkpoint_file(filename)
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    common = [key for key in state if key in model_state]
    if state and not common:
        raise ConfigError(f"checkpoint {filename} shares no tensor name with this model (it has e.g. "
                          f"{', '.join(list(state)[:3])}; the model {', '.join(list(model_state)[:3])}): is it "
                          "a plain student.pth given to a distillation run, or another detector's? Nothing was loaded")
    wrong, listed = shape_mismatches(state, model_state)
    if wrong:
        raise ConfigError(f"checkpoint {filename} does not fit this model: {len(wrong)} of its {len(common)} shared "
                          f"tensors have other shapes ({listed}). Was it trained "
                          "with another config (widths, classes)? Use that config, another --work-dir, or no "
                          "--resume / load_from")


def train(options: TrainOptions):
    """Build the Runner from :func:`build_runner_config` and train; returns the Runner."""

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        import torch.distributed as dist

        if not dist.is_initialized():  # the Runner then uses this group instead of its CUDA-only init
            dist.init_process_group(backend="gloo")
    cfg = build_runner_config(options)
    # mmengine's resume calls torch.load itself: allow OpenMMLab's checkpoint types (only those), for
    # this training only, so that a Python caller's later torch.load keeps torch's own allow-list
    with openmmlab_safe_globals():
        runner = _runner_class().from_cfg(cfg)
        runner.train()
    save_student(runner, options.student_config)
    return runner


def save_student(runner, student_config: str) -> str:
    """Write ``<work_dir>/student.pth``: the trained detector alone (no projection heads or CRD
    memory), an mmengine checkpoint that plain mmdet3d tools load with the student config."""
    from mmengine.dist import is_main_process
    from mmengine.model import is_model_wrapper
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

    from trainer.distiller import CacheDistiller

    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    detector = model.student if isinstance(model, CacheDistiller) else model
    path = os.path.join(runner.work_dir, "student.pth")
    if is_main_process():
        save_checkpoint({"meta": {"config": student_config, "epoch": runner.epoch, "iter": runner.iter},
                         "state_dict": weights_to_cpu(detector.state_dict())}, path)
    return path
