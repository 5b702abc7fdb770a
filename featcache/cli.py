"""The ``featcache`` command line (click). Heavy imports happen inside commands, so
``featcache --help`` is instant."""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from typing import Any, Callable

import click

from featcache.errors import FeatcacheError


def fail_cleanly(command: Callable) -> Callable:
    """featcache's own errors end the command with their message and exit status 1, no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FeatcacheError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    return wrapper


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--storage-options") from exc
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--storage-options")
    return value


class KeyValueItems(click.Option):
    """``--cfg-options KEY=VALUE [KEY=VALUE ...]``, as mmengine's ``DictAction`` and every mmdet3d tool take it:
    one flag takes several items, and the flag may be repeated. After the item the flag takes as usual, the
    tokens that follow are taken too while each looks like ``KEY=VALUE`` (holds an ``=`` after a key, does
    not start with ``-``); the first one that does not (an option, a positional argument without ``=``, or
    ``--``) ends the list. Values are mmengine's: ``a=1``, ``a=x,y`` and ``a=[x,y]`` (lists), ``a=(x,y)``
    (a tuple), ``a=None``/``True``; a later item for the same key wins."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("multiple", True)
        kwargs.setdefault("metavar", "KEY=VALUE ...")
        super().__init__(*args, **kwargs)

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            option = parser._long_opt.get(name) or parser._short_opt.get(name)
            if option is None:
                continue
            take_one = option.process

            def process(value: Any, state: Any, take_one: Callable = take_one) -> None:
                take_one(value, state)
                while state.rargs and _KEY_VALUE.match(state.rargs[0]):
                    take_one(state.rargs.pop(0), state)

            option.process = process


_KEY_VALUE = re.compile(r"^[A-Za-z_][^=\s]*=")


def cfg_options_option(help_text: str, name: str = "--cfg-options") -> Callable:
    """A ``KeyValueItems`` option (``--cfg-options`` semantics) with ``help_text``."""
    return click.option(name, cls=KeyValueItems, help=help_text + " Several KEY=VALUE per flag, or repeat the flag "
                        "(mmengine's DictAction: a=1 b=x,y c=[1,2] d=(1,2)).")


storage_option = click.option("--storage-options", default=None, metavar="JSON",
                              help='fsspec options for URL caches, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:5000"}}\'.')


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="featcache")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Offline teacher-feature caching and distillation for lidar BEV detectors."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("teacher_config")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", required=True, help="Cache directory or fsspec URL (s3://...).")
@click.option("--layers", default=None,
              help="Comma-separated module names to record (default: the detector's BEV modules, "
                   "pts_middle_encoder,pts_backbone,pts_neck for MVX-style detectors such as CenterPoint and "
                   "BEVFusion, middle_encoder,backbone,neck for single-stage ones such as KITTI PointPillars).")
@click.option("--head-outputs", default=None, metavar="KINDS",
              help="Also cache the head's dense outputs, per task: 'all' or some of heatmap,reg,height,dim,rot,vel "
                   "(CenterHead; heatmaps stored as sigmoid scores, asin8-zstd3, the others fp16-zstd1, unless "
                   "--codec names them). The manifest says each channel's class or meaning.")
@click.option("--dense-head-outputs", is_flag=True,
              help="Keep the regression head outputs (reg, height, dim, rot, vel) at every cell. By default they "
                   "are stored at the cells of box centres only (annotated boxes of every class, and the teacher's "
                   "own with --boxes), where the reg term reads them, and 0 elsewhere: ~2% of the cells.")
@click.option("--boxes", is_flag=True,
              help="Also cache the teacher's decoded predictions (its own decoder and NMS): boxes, scores, labels "
                   "per sample, for label distillation.")
@click.option("--max-boxes", type=int, default=None,
              help="Boxes kept per sample with --boxes (default: the teacher's test_cfg max_per_img, else 500); "
                   "a sample with more keeps its highest-scoring ones, with a warning.")
@click.option("--bev-layout", default=None, metavar="LAYOUT",
              help="Which array axis of the BEV maps is x: yx (rows = y, mmdet3d's detectors) or xy (rows = x, "
                   "BEVFusion), -yx etc. with an axis reversed; for every layer, or per layer/module "
                   "(pts_neck=xy,pts_bbox_head=xy). By default the build measures it on the first sample (the "
                   "scan's points against the maps) and records it; state it where that cannot decide.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True)
@click.option("--codec", default=None, help="int8-zstd3 (default), fp16-zstd1, fp32-none, bf16-zstd3, int8-lz4...; or per layer: "
                                            "pts_neck=int8-zstd3,pts_backbone=fp16-lz4; or per head output kind "
                                            "(every task's): heatmap=asin8-zstd3,reg=fp32-none. Class heatmaps only: "
                                            "score8 / asin8 (sigmoid scores on a uniform / arcsine-root grid).")
@cfg_options_option("Override teacher config entries, e.g. train_dataloader.dataset.dataset.data_root=/data/nus/.")
@click.option("--force", is_flag=True, help="Erase the featcache cache at --out and start over (only featcache's own "
                                          "files; a directory featcache did not create is refused).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--num-workers", type=click.IntRange(min=0), default=1, show_default=True, help="DataLoader workers.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available).")
@click.option("--trust-global", multiple=True, metavar="MODULE.NAME",
              help="Allow one more type in the checkpoint's pickle (only for checkpoints you trust).")
@storage_option
@fail_cleanly
def build(teacher_config: str, checkpoint: str, out: str, layers: str | None, head_outputs: str | None,
          dense_head_outputs: bool, boxes: bool, max_boxes: int | None, bev_layout: str | None, split: str,
          codec: str | None, cfg_options: tuple[str, ...], force: bool, batch_size: int, num_workers: int, device: str | None,
          trust_global: tuple[str, ...], storage_options: str | None) -> None:
    """Run TEACHER_CONFIG with CHECKPOINT once over a split and cache its features.

    Re-running the same command resumes; under `torchrun --nproc_per_node N` ranks share the work.
    """
    from featcache.teacher.options import BuildOptions, check_cfg_option_items

    # every option, --out included, before the heavy imports and the teacher's set-up
    check_cfg_option_items(cfg_options)
    options = BuildOptions(
        teacher_config=teacher_config, checkpoint=checkpoint, out=out, layers=layers, split=split, codec=codec,
        force=force, batch_size=batch_size, num_workers=num_workers, device=device,
        storage_options=parse_storage_options(storage_options), trust_globals=trust_global,
        head_outputs=head_outputs, dense_head_outputs=dense_head_outputs, boxes=boxes, max_boxes=max_boxes,
        bev_layout=bev_layout)
    options.validate()

    from featcache.teacher.build import build_cache
    from featcache.teacher.options import parse_cfg_options

    options.cfg_options = parse_cfg_options(cfg_options)
    result = build_cache(options)
    click.echo(f"{result.location}: wrote {result.written} samples in {result.seconds:.1f}s "
               f"({result.already_complete} already complete, {result.total} in split)")
    if result.invalid_keys:
        raise click.ClickException(f"{len(result.invalid_keys)} samples had non-finite teacher output and were not "
                                   f"cached: {', '.join(result.invalid_keys)}")


@main.command()
@click.argument("cache")
@click.option("--repair", is_flag=True, help="Rebuild missing/corrupt samples with the teacher.")
@click.option("--teacher-config", default=None, help="For --repair (default: the path in the manifest).")
@click.option("--checkpoint", default=None, help="For --repair (default: the path in the manifest).")
@cfg_options_option("For --repair: as given to build.")
@storage_option
@fail_cleanly
def verify(cache: str, repair: bool, teacher_config: str | None, checkpoint: str | None,
           cfg_options: tuple[str, ...], storage_options: str | None) -> None:
    """Check presence and checksum of every sample; exit 1 listing bad samples."""
    from featcache.verify import verify_cache

    options = parse_storage_options(storage_options)
    report = verify_cache(cache, options, progress=sys.stderr.isatty())
    click.echo(report.summary())
    if repair and report.bad_rows:
        from featcache.errors import ConfigError
        from featcache.reader import open_cache
        from featcache.teacher.build import BuildOptions, build_cache
        from featcache.teacher.options import parse_cfg_options

        manifest, overrides = open_cache(cache, options).manifest, parse_cfg_options(cfg_options)
        try:
            repair_options = BuildOptions.from_manifest(manifest, cache, report.bad_rows, teacher_config=teacher_config,
                                                        checkpoint=checkpoint, cfg_options=overrides,
                                                        storage_options=options)
        except ConfigError as exc:  # no checkpoint to repair with: a usage error of verify --repair
            raise click.UsageError(str(exc)) from exc
        result = build_cache(repair_options)
        click.echo(f"repaired {result.written} samples")
        report = verify_cache(cache, options)
        click.echo(report.summary())
    if not report.ok:
        sys.exit(1)


@main.command(name="inspect")
@click.argument("cache")
@click.option("--fidelity", "fidelity_samples", type=click.IntRange(min=0), default=0,
              help="Re-run the teacher on N samples and compare with the decoded cache.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG of a sample's BEV energy.")
@click.option("--sample", default=None, help="Sample key for --plot (default: the first complete one).")
@click.option("--checkpoint", default=None, help="Teacher checkpoint for --fidelity (default: from the manifest).")
@cfg_options_option("For --fidelity: as given to build.")
@storage_option
@fail_cleanly
def inspect_command(cache: str, fidelity_samples: int, plot: str | None, sample: str | None, checkpoint: str | None,
                    cfg_options: tuple[str, ...], storage_options: str | None) -> None:
    """Manifest, per-layer shape/dtype/codec, bytes per sample, compression ratio, completion."""
    import os

    if plot:  # before anything is read: the PNG's name and folder
        if os.path.splitext(plot)[1].lower() != ".png":
            raise click.BadParameter(f"{plot!r}: the plot is a PNG; give a name ending with .png", param_hint="--plot")
        folder = os.path.dirname(os.path.abspath(plot))
        if not os.path.isdir(folder):
            raise click.BadParameter(f"{plot!r}: folder {folder} does not exist; create it or choose another path",
                                     param_hint="--plot")
    import numpy as np

    from featcache import format
    from featcache.inspection import describe, plot_sample
    from featcache.reader import open_cache

    options = parse_storage_options(storage_options)
    click.echo(describe(cache, options))
    reader = open_cache(cache, options)
    complete = np.flatnonzero(reader.status() == format.STATUS_COMPLETE)
    if plot:
        key = sample or (reader.row_keys[complete[0]] if len(complete) else None)
        if key is None:
            raise click.ClickException("no complete sample to plot")
        click.echo(f"wrote {plot_sample(reader, key, plot)} (sample {key})")
    if fidelity_samples:
        from featcache.teacher.fidelity import FidelityCheck
        from featcache.teacher.options import parse_cfg_options

        check = FidelityCheck(reader, checkpoint=checkpoint, cfg_options=parse_cfg_options(cfg_options))
        rows = complete[:fidelity_samples]
        click.echo(f"\nfidelity vs fp32 teacher output ({len(rows)} samples)")
        if check.at_centres:
            click.echo("  (regression outputs: at the box-centre cells the cache keeps them at)")
        for key, name, figures in check.compare(rows):
            click.echo(f"  {key:<34} {name:<22} cosine {figures['cosine']:.6f}  "
                       f"max|err| {figures['max_abs_error']:.3g} (max|x| {figures['max_abs_value']:.3g})")


@main.command()
@click.argument("cache")
@click.option("--format", "export_format", type=click.Choice(["hdf5"]), required=True)
@click.argument("out")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an existing file (never a directory).")
@storage_option
@fail_cleanly
def export(cache: str, export_format: str, out: str, overwrite: bool, storage_options: str | None) -> None:
    """Export CACHE to OUT (one HDF5 file, .h5 or .hdf5, which the reader also opens). An existing OUT
    is refused unless --overwrite."""
    from featcache.export import check_export_target

    check_export_target(cache, out, overwrite)  # before the cache is read
    from featcache.export import export_hdf5

    written = export_hdf5(cache, out, parse_storage_options(storage_options), overwrite=overwrite,
                          progress=sys.stderr.isatty())
    click.echo(f"wrote {written}")


@main.command()
@click.argument("student_config")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", required=True, help="Export directory (new or empty; an existing export only with --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace the featcache export at --out (its own files only).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write model.int8.onnx, statically quantised on --calibration-scans training scans.")
@click.option("--calibration-scans", type=click.IntRange(min=1), default=None,
              help="Training scans to calibrate int8 on [default: 32].")  # featcache.deploy.quantize.CALIBRATION_SCANS (a test keeps them equal)
@cfg_options_option("Override config entries, e.g. train_dataloader.dataset.data_root=data/x/.")
@fail_cleanly
def deploy(student_config: str, checkpoint: str, out: str, overwrite: bool, quantize: str | None,
           calibration_scans: int | None, cfg_options: tuple[str, ...]) -> None:
    """Export STUDENT_CONFIG with CHECKPOINT for ONNX Runtime: OUT/model.onnx + OUT/deploy.json."""
    from featcache.deploy.export import check_out_directory

    check_out_directory(out, overwrite)  # before any model work
    from featcache.deploy.export import export_detector
    from featcache.teacher.options import parse_cfg_options

    result = export_detector(student_config, checkpoint, out, overwrite=overwrite,
                             cfg_options=parse_cfg_options(cfg_options), quantize=quantize,
                             calibration_scans=calibration_scans)
    spec = result.spec
    click.echo(f"{out}: model.onnx (opset {spec.onnx.opset}, {spec.source['num_parameters']:,} parameters, "
               f"ORT vs PyTorch max|diff| {spec.check['max_abs_diff_fp32']:.2g}"
               + (f"; int8: {spec.onnx.int8['file']}" if spec.onnx.int8 else "") + f") in {result.seconds:.1f}s")


@main.command(name="unlabelled-infos")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--from-infos", "from_infos", type=click.Path(dir_okay=False), default=None,
              help="An mmdet3d nuScenes info file: every keyframe's lidar_sweeps become samples, keyed by their "
                   "sample_data_token, each with its own earlier sweeps.")
@click.option("--from-scans", "from_scans", type=click.Path(file_okay=False), default=None,
              help="A folder of .bin scans (every one below it): samples keyed by their path relative to the folder.")
@click.option("--data-prefix", nargs=2, default=("samples/LIDAR_TOP", "sweeps/LIDAR_TOP"), show_default=True,
              metavar="PTS SWEEPS", help="--from-infos: the dataset's data_prefix.pts and .sweeps, which place each "
                                         "sweep's own file.")
@click.option("--max-earlier-sweeps", type=click.IntRange(min=0), default=None,
              help="--from-infos: earlier sweeps kept per sample for multi-sweep input (default: all its keyframe has).")
@click.option("--relative-to", type=click.Path(file_okay=False), default=None,
              help="--from-scans: the directory the dataset's data_prefix.pts names (lidar paths are written relative "
                   "to it; default: the scans' folder).")
@click.option("--num-pts-feats", type=click.IntRange(min=1), default=5, show_default=True,
              help="--from-scans: float32 values per point in the files (nuScenes 5, KITTI 4).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@fail_cleanly
def unlabelled_infos(out: str, from_infos: str | None, from_scans: str | None, data_prefix: tuple[str, str],
                     max_earlier_sweeps: int | None, relative_to: str | None, num_pts_feats: int,
                     overwrite: bool) -> None:
    """Write OUT (.pkl), an mmdet3d info file of unlabelled scans, for `featcache build` and `featcache train
    --unlabelled`: teacher targets where no labels exist."""
    from featcache.errors import ConfigError
    from featcache.teacher import unlabelled

    if (from_infos is None) == (from_scans is None):
        raise ConfigError("give one of --from-infos (nuScenes sweeps) or --from-scans (a folder of .bin scans)")
    if os.path.exists(out) and not overwrite:
        raise ConfigError(f"{out} exists; give --overwrite to replace it, or another path")
    if from_infos is not None:
        infos = unlabelled.load_infos(from_infos)
        data_list, report = unlabelled.sweep_infos(infos, from_infos, max_earlier_sweeps, *data_prefix)
        unlabelled.write_infos(out, data_list, infos.get("metainfo", {}))
        click.echo(f"{out}: {report.summary()}. Build it with the labelled split's data_root and prefixes "
                   f"(--cfg-options train_dataloader.dataset.ann_file={out}, or the dataset below a CBGS wrapper)")
    else:
        data_list = unlabelled.scan_infos(from_scans, num_pts_feats, relative_to)
        unlabelled.write_infos(out, data_list, {})
        click.echo(f"{out}: {len(data_list)} unlabelled scans from {from_scans}, lidar paths relative to "
                   f"{relative_to or from_scans} (the dataset's data_prefix.pts must name it). Build their targets with "
                   f"--cfg-options train_dataloader.dataset.ann_file={out} (or the dataset below a CBGS wrapper)")


@main.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.argument("scan", type=click.Path(dir_okay=False))
@click.option("--out", default=None, help="Write the predictions to a .json or .npz file instead of printing them.")
@click.option("--int8", "use_int8", is_flag=True, help="Run the export's int8 model.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@fail_cleanly
def predict(export_dir: str, scan: str, out: str | None, use_int8: bool, threads: int | None) -> None:
    """Detect boxes in SCAN (.bin) with the export in EXPORT_DIR (numpy + onnxruntime only, no torch/mmdet3d)."""
    from featcache.deploy.runtime import DeployedDetector, detections_to_dict, write_detections

    detector = DeployedDetector.open(export_dir, threads=threads, variant="int8" if use_int8 else "fp32")
    detections = detector.predict(scan)
    if out:
        click.echo(f"{write_detections(detections, detector.spec.class_names, out)}: {len(detections)} boxes")
    else:
        click.echo(json.dumps(detections_to_dict(detections, detector.spec.class_names)))


if __name__ == "__main__":
    main()
