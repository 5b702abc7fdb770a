"""``featcache train``: turn a student config plus a cache into an mmengine Runner and train.

What is added to the user's config: the model becomes a ``CacheDistiller`` around it (heads
sized from a probe of the student and the cache manifest), the train pipeline's
``Pack3DDetInputs`` becomes ``PackDetInputsWithCache``, the train sampler is wrapped in
``CacheReadaheadSampler`` (same order; cold reads announced ahead), and a work dir. Everything else (logs,
checkpoints, ``--resume``, schedulers, TensorBoard, DDP via ``torchrun``) is mmengine's Runner.
Mismatches between the cache and the student's data are errors before any training step.

What the run was asked for is :mod:`trainer.options`; the distiller's model config is assembled in
:mod:`trainer.model_config` (grids in :mod:`trainer.grids`, response pairs in :mod:`trainer.response_pairs`).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from featcache.errors import ConfigError
from featcache.teacher import models
from featcache.teacher.checkpoint import openmmlab_safe_globals
from trainer.model_config import distiller_model_cfg
from trainer.options import TrainOptions, resolve_unlabelled

__all__ = ["TrainOptions", "build_runner_config", "train", "save_student", "check_checkpoint_fits"]

TRAINER_IMPORTS = ["trainer.distiller", "trainer.transforms", "trainer.samplers", "trainer.unlabelled"]


def build_runner_config(options: TrainOptions):
    """The full mmengine config ``featcache train`` runs (also what lands in work_dir)."""
    cfg = models.load_config(options.student_config, options.cfg_options)
    models.init_mmdet3d_scope()
    import trainer.distiller  # noqa: F401  (registers CacheDistiller / PackDetInputsWithCache)
    import trainer.samplers  # noqa: F401  (registers CacheReadaheadSampler)

    if not options.no_distill:
        cfg.model = distiller_model_cfg(cfg, options)
    else:
        resolve_unlabelled(cfg, options)  # --unlabelled with --no-distill: refused in one line
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
