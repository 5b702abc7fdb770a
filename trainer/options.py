"""What ``featcache train`` was asked for (:class:`TrainOptions`) and the distillation terms it resolves to
(:func:`resolve_terms`: ``--kd``, else the student config's ``distill``, else ``crd=1``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from featcache.errors import ConfigError


@dataclass
class TrainOptions:
    """What ``featcache train`` was asked for. Distillation terms come from ``kd`` (``--kd``), else the
    student config's ``distill = dict(terms=..., warmup_iters=...)``, else ``crd=1``."""

    student_config: str
    cache: str | None
    work_dir: str | None = None
    kd: dict[str, float | dict] | None = None  # term -> weight or dict(weight=..., **params) (--kd pkd=5,heatmap=2:loss=focal)
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
    # --unlabelled: scans with teacher targets only, dict(ann_file=..., cache=None (--cache), per_labelled=1)
    unlabelled: dict[str, Any] | None = None


def resolve_terms(cfg, options: TrainOptions) -> tuple[dict[str, dict], int]:
    """The distillation terms (name -> dict(weight=..., **params)) and warm-up iterations of a run.

    ``--kd`` names the terms and their weights; a term's other parameters come from the student
    config's ``distill.terms`` entry of the same name, ``--temperature`` / ``--feat-dim`` override
    them where the term takes them. The deprecated ``--loss X --alpha-crd A`` means ``--kd X=A``.
    """
    from trainer.terms import TERMS

    configured = dict(cfg.get("distill") or {})
    unknown = sorted(set(configured) - {"terms", "warmup_iters", "unlabelled"})
    if unknown:
        raise ConfigError(f"{options.student_config}: distill has no setting {', '.join(unknown)} "
                          "(it takes terms=dict(name=weight or dict(weight=..., ...)), warmup_iters=N and "
                          "unlabelled=dict(ann_file=..., cache=..., per_labelled=N))")
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
        # --kd's weight and parameters (heatmap=2:loss=focal) over the config's entry of the same term
        terms = {name: {**config_terms.get(name, {}),
                        **(dict(value) if isinstance(value, dict) else {"weight": float(value)})}
                 for name, value in kd.items()}
    else:
        terms = config_terms or {"crd": {"weight": 1.0}}
    for name, params in terms.items():
        if name not in TERMS:
            raise ConfigError(f"distillation term {name!r} (from {'--kd' if kd else options.student_config}) does "
                              f"not exist; choose from {', '.join(sorted(TERMS))}")
        accepted = TERMS[name].parameters()
        for option, value in (("temperature", options.temperature), ("feat_dim", options.feat_dim)):
            if value is not None and option in accepted:
                params[option] = value
    warmup = options.kd_warmup if options.kd_warmup is not None else int(configured.get("warmup_iters", 0))
    if warmup < 0:
        raise ConfigError(f"distillation warm-up must be >= 0 iterations, got {warmup}")
    return terms, warmup


UNLABELLED_SETTINGS = ("ann_file", "cache", "per_labelled", "pseudo_labels")


def resolve_unlabelled(cfg, options: TrainOptions) -> dict[str, Any] | None:
    """The run's unlabelled scans: ``--unlabelled`` (with ``--unlabelled-cache``, ``--unlabelled-per-labelled``)
    over the student config's ``distill.unlabelled``; None without either. dict(ann_file, cache (None: the run's
    --cache), per_labelled (unlabelled scans per labelled sample in each step, default 1), pseudo_labels (None; a
    score: the baseline of hard pseudo-labels, the teacher's cached boxes scoring at least that as the unlabelled
    scans' GT, trained through the detection loss))."""
    configured = dict((cfg.get("distill") or {}).get("unlabelled") or {})
    given = {key: value for key, value in (options.unlabelled or {}).items() if value is not None}
    if options.no_distill:  # the plain student: the config's distill section is not read, --unlabelled refused
        if given:
            raise ConfigError(f"--unlabelled {given.get('ann_file', '')}: unlabelled scans are trained on through "
                              "cached teacher targets only, and --no-distill trains none; give --cache and --kd, or "
                              "leave --unlabelled out")
        return None
    spec = {**configured, **given}
    if not spec:
        return None
    unknown = sorted(set(spec) - set(UNLABELLED_SETTINGS))
    if unknown:
        raise ConfigError(f"{options.student_config}: distill.unlabelled has no setting {', '.join(unknown)} (it "
                          f"takes {', '.join(UNLABELLED_SETTINGS)})")
    if not spec.get("ann_file"):
        raise ConfigError("--unlabelled-cache / --unlabelled-per-labelled need --unlabelled INFOS (or "
                          "distill.unlabelled.ann_file): the info file of the unlabelled scans")
    per_labelled = spec.setdefault("per_labelled", 1)
    if not isinstance(per_labelled, int) or per_labelled < 1:
        raise ConfigError(f"unlabelled per_labelled must be an integer >= 1 (unlabelled scans per labelled sample in "
                          f"each step), got {per_labelled!r}")
    if options.online_teacher or not options.cache:
        raise ConfigError(f"--unlabelled {spec['ann_file']}: unlabelled scans are trained on through cached teacher "
                          "targets only (--online-teacher is for comparisons on labelled data); give --cache and --kd")
    pseudo = spec.setdefault("pseudo_labels", None)
    if pseudo is not None and not 0 < float(pseudo) <= 1:
        raise ConfigError(f"unlabelled pseudo_labels (--unlabelled-pseudo-labels) is the teacher's box score above "
                          f"which its boxes become GT, in (0, 1]; got {pseudo!r}")
    spec.setdefault("cache", None)
    return spec
