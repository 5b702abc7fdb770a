"""The full ``featcache`` command: featcache's commands plus ``train`` (which needs the trainer).

The console script points here so that the ``featcache`` package never imports ``trainer``.
"""
from __future__ import annotations

import click

from featcache.cli import fail_cleanly, main, parse_storage_options, storage_option


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


@main.command()
@click.argument("student_config")
@click.option("--cache", default=None, help="Feature cache built by `featcache build`.")
@click.option("--work-dir", default=None, help="Default: work_dirs/<config name>.")
@click.option("--loss", type=click.Choice(["crd", "infonce", "mse"]), default="crd", show_default=True)
@click.option("--alpha-crd", "alpha", type=float, default=1.0, show_default=True, help="Weight of the distillation loss.")
@click.option("--temperature", type=float, default=0.07, show_default=True)
@click.option("--feat-dim", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--pairs", default=None, help="student_layer=cache_layer,... (default: layers with the same name).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --work-dir.")
@click.option("--cfg-options", multiple=True, metavar="KEY=VALUE", help="Override student config entries.")
@click.option("--skip-corrupt", is_flag=True, help="Skip (and count) samples whose cache entry is damaged.")
@click.option("--online-teacher", nargs=2, default=None, metavar="CONFIG CKPT",
              help="Compute targets with a live teacher instead of a cache (for comparisons).")
@click.option("--teacher-cfg-options", multiple=True, metavar="KEY=VALUE", help="Overrides for --online-teacher.")
@click.option("--no-distill", is_flag=True, help="Train the student with its detection loss only (baseline).")
@storage_option
@fail_cleanly
def train(student_config: str, cache: str | None, work_dir: str | None, loss: str, alpha: float, temperature: float,
          feat_dim: int, pairs: str | None, resume: bool, cfg_options: tuple[str, ...], skip_corrupt: bool,
          online_teacher: tuple[str, str] | None, teacher_cfg_options: tuple[str, ...], no_distill: bool,
          storage_options: str | None) -> None:
    """Train STUDENT_CONFIG with detection + distillation loss against cached teacher features.

    No teacher is built or loaded when --cache is given. Under `torchrun` it trains with DDP.
    """
    from featcache.models import parse_cfg_options
    from trainer.train import TrainOptions, train as run_training

    run_training(TrainOptions(
        student_config=student_config, cache=cache, work_dir=work_dir, loss=loss, alpha=alpha,
        temperature=temperature, feat_dim=feat_dim, pairs=_pairs(pairs), resume=resume,
        cfg_options=parse_cfg_options(cfg_options), storage_options=parse_storage_options(storage_options),
        skip_corrupt=skip_corrupt, online_teacher=tuple(online_teacher) if online_teacher else None,
        teacher_cfg_options=parse_cfg_options(teacher_cfg_options), no_distill=no_distill))


if __name__ == "__main__":
    main()
