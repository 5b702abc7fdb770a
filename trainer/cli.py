"""The full ``featcache`` command: featcache's commands plus ``train`` (which needs the trainer).

The console script points here so that the ``featcache`` package never imports ``trainer``.
"""
from __future__ import annotations

import click

from featcache.cli import cfg_options_option, fail_cleanly, main, parse_storage_options, storage_option


def _pairs(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        student, sep, teacher = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not student_layer=cache_layer", param_hint="--pairs")
        pairs[student] = teacher
    return pairs


def _kd(text: str | None) -> dict[str, float | dict] | None:
    if text is None:  # not given: the student config's terms
        return None
    from trainer.terms import parse_kd_spec

    names = [item.partition("=")[0].strip() for item in (part.strip() for part in text.split(",")) if item]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # parse_kd_spec would keep the last weight of each
        raise click.BadParameter(f"{text!r} names {', '.join(map(repr, twice))} more than once; give each term once "
                                 "with its weight (e.g. --kd infonce=2,pkd=5)", param_hint="--kd")
    try:
        return parse_kd_spec(text)  # an empty --kd "" names no term: refused there, not taken for "not given"
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--kd") from None


@main.command()
@click.argument("student_config")
@click.option("--cache", default=None, help="Feature cache built by `featcache build`.")
@click.option("--work-dir", default=None, help="Default: work_dirs/<config name>.")
@click.option("--kd", default=None, metavar="TERM=WEIGHT,...",
              help="Distillation terms and weights, e.g. infonce=1,pkd=5 (terms: crd, infonce, mse, pkd; heatmap, "
                   "reg from a cache built with --head-outputs; label from a cache built with --boxes); a term's "
                   "parameters follow its weight after colons (heatmap=1:loss=focal). Default: the student "
                   "config's distill.terms, else crd=1.")
@click.option("--kd-warmup", type=click.IntRange(min=0), default=None, metavar="ITERS",
              help="Raise the distillation weights linearly over the first ITERS iterations.")
@click.option("--loss", type=click.Choice(["crd", "infonce", "mse", "pkd"]), default=None,
              help="Deprecated: --loss X --alpha-crd A is --kd X=A.")
@click.option("--alpha-crd", "alpha", type=float, default=None, help="Deprecated: the weight of --loss (see --kd).")
@click.option("--temperature", type=float, default=None, help="Temperature of crd and infonce (default 0.07).")
@click.option("--feat-dim", type=click.IntRange(min=1), default=None,
              help="Embedding size of crd's and infonce's projection heads (default 128).")
@click.option("--pairs", default=None, help="student_layer=cache_layer,... (default: layers with the same name).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --work-dir.")
@cfg_options_option("Override student config entries.")
@click.option("--skip-corrupt", is_flag=True, help="Skip (and count) samples whose cache entry is damaged.")
@click.option("--online-teacher", nargs=2, default=None, metavar="CONFIG CKPT",
              help="Compute targets with a live teacher instead of a cache (for comparisons).")
@cfg_options_option("Overrides for --online-teacher.", name="--teacher-cfg-options")
@click.option("--no-distill", is_flag=True, help="Train the student with its detection loss only (baseline).")
@click.option("--init-from-teacher", nargs=2, default=None, metavar="CONFIG CKPT",
              help="Start the student from the teacher's weights sliced to its widths (a student of the teacher's "
                   "family; one weight load, no teacher forward). Combines with any --kd or --no-distill.")
@click.option("--force-alignment", is_flag=True,
              help="Train even where the check before training refuses a pair (its teacher map agrees with the "
                   "scans clearly better transposed, or (almost) none of the student's cells lie on the teacher's grid).")
@click.option("--unlabelled", default=None, metavar="INFOS",
              help="An info file of unlabelled scans (featcache unlabelled-infos) whose teacher targets are cached: "
                   "each step adds them to the labelled batch; the distillation terms train on them, the detection "
                   "loss never does.")
@click.option("--unlabelled-cache", default=None, metavar="CACHE",
              help="The cache holding the unlabelled scans' targets (default: --cache).")
@click.option("--unlabelled-per-labelled", type=click.IntRange(min=1), default=None, metavar="N",
              help="Unlabelled scans per labelled sample in each step (default 1).")
@click.option("--unlabelled-pseudo-labels", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              metavar="SCORE", help="A baseline, not the method: the teacher's cached boxes scoring >= SCORE become the "
                                    "unlabelled scans' GT and they go through the detection loss (hard pseudo-labels).")
@storage_option
@fail_cleanly
def train(student_config: str, cache: str | None, work_dir: str | None, kd: str | None, kd_warmup: int | None,
          loss: str | None, alpha: float | None, temperature: float | None, feat_dim: int | None, pairs: str | None,
          resume: bool, cfg_options: tuple[str, ...], skip_corrupt: bool, online_teacher: tuple[str, str] | None,
          teacher_cfg_options: tuple[str, ...], no_distill: bool, init_from_teacher: tuple[str, str] | None,
          force_alignment: bool, unlabelled: str | None, unlabelled_cache: str | None,
          unlabelled_per_labelled: int | None, unlabelled_pseudo_labels: float | None,
          storage_options: str | None) -> None:
    """Train STUDENT_CONFIG with detection + distillation losses against cached teacher features.

    No teacher is run when --cache is given (--init-from-teacher loads its weights once, before the first
    step). Under `torchrun` it trains with DDP.
    """
    from featcache.teacher.options import parse_cfg_options
    from trainer.train import TrainOptions, train as run_training

    run_training(TrainOptions(
        student_config=student_config, cache=cache, work_dir=work_dir, kd=_kd(kd), kd_warmup=kd_warmup, loss=loss,
        alpha=alpha, temperature=temperature, feat_dim=feat_dim, pairs=_pairs(pairs), resume=resume,
        cfg_options=parse_cfg_options(cfg_options), storage_options=parse_storage_options(storage_options),
        skip_corrupt=skip_corrupt, online_teacher=tuple(online_teacher) if online_teacher else None,
        teacher_cfg_options=parse_cfg_options(teacher_cfg_options), no_distill=no_distill,
        init_from_teacher=tuple(init_from_teacher) if init_from_teacher else None, force_alignment=force_alignment,
        unlabelled=dict(ann_file=unlabelled, cache=unlabelled_cache, per_labelled=unlabelled_per_labelled,
                        pseudo_labels=unlabelled_pseudo_labels)))


if __name__ == "__main__":
    main()
