"""Bad input stops `featcache build` with a message naming the culprit, keeps what was written,
and the cache resumes once the input is fixed; a bad option stops it before any model, dataset or
teacher work (the teacher's builders replaced by ones that fail the test)."""
from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featcache import format
from featcache.reader import open_cache
from featcache.verify import verify_cache
from lidar_fixtures import PILLAR_CONFIG, cfg_option_args, nus_cfg_options

FEATCACHE = [sys.executable, "-m", "featcache.cli"]
BAD_ROW = 3


def _damage(path: Path, how: str) -> None:
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 5)
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 3])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "nan":
        points[::7, :3] = np.nan
        points.tofile(path)
    elif how == "four_features":  # a KITTI-style x, y, z, reflectance file where 5 are expected
        np.ascontiguousarray(points[:-1, :4]).tofile(path)
    elif how == "out_of_range":  # every point far outside the point cloud range
        points[:, :3] += 1000.0
        points.tofile(path)


def _build(data: Path, ckpt: Path, out: Path) -> subprocess.CompletedProcess:
    args = ["build", PILLAR_CONFIG, str(ckpt), "--out", str(out), "--layers", "pts_neck", "--num-workers", "0",
            *cfg_option_args(nus_cfg_options(data))]
    return subprocess.run(FEATCACHE + args, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("how, message", [
    ("missing", "No such file"), ("truncated", "cannot be loaded"), ("empty", "no points"),
    ("nan", "NaN/Inf point"), ("four_features", "cannot be loaded"),
    ("out_of_range", "No points in the point cloud range"),
])
def test_bad_lidar_file_is_named_and_cache_resumes(nus_six, pillar_ckpt, tmp_path, how, message):
    data = tmp_path / "data"
    shutil.copytree(nus_six, data)
    infos = pickle.loads((data / "infos.pkl").read_bytes())["data_list"]
    bad_file = data / "samples" / "LIDAR_TOP" / infos[BAD_ROW]["lidar_points"]["lidar_path"]
    original = bad_file.read_bytes()
    _damage(bad_file, how)
    out = tmp_path / "cache"

    failed = _build(data, pillar_ckpt, out)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert infos[BAD_ROW]["token"] in failed.stderr and bad_file.name in failed.stderr
    assert message in failed.stderr, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    status = open_cache(out).status()
    assert (status[:BAD_ROW] == format.STATUS_COMPLETE).all()  # what came before is kept
    assert (status[BAD_ROW:] == format.STATUS_MISSING).all()

    bad_file.write_bytes(original)
    resumed = _build(data, pillar_ckpt, out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"wrote {6 - BAD_ROW} samples" in resumed.stdout
    assert verify_cache(str(out)).ok


def test_info_file_with_missing_keys_is_named(nus_six, pillar_ckpt, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(nus_six, data)
    infos = pickle.loads((data / "infos.pkl").read_bytes())
    del infos["data_list"][2]["lidar_points"]
    (data / "infos.pkl").write_bytes(pickle.dumps(infos))
    failed = _build(data, pillar_ckpt, tmp_path / "cache")
    assert failed.returncode == 1 and "infos.pkl" in failed.stderr and "lidar_points" in failed.stderr


@pytest.mark.parametrize("content, message", [(b"\x00" * 64, "not a readable PyTorch checkpoint"),
                                              (None, "does not exist")])
def test_bad_checkpoint_is_named(nus_one, tmp_path, content, message):
    ckpt = tmp_path / "teacher.pth"
    if content is not None:
        ckpt.write_bytes(content)
    failed = _build(nus_one, ckpt, tmp_path / "cache")
    assert failed.returncode == 1 and "teacher.pth" in failed.stderr and message in failed.stderr
    assert "Traceback" not in failed.stderr


def test_config_that_does_not_build_is_named(nus_one, pillar_ckpt, tmp_path):
    config = tmp_path / "broken_teacher.py"
    config.write_text(f"_base_ = ['mmdet3d::{PILLAR_CONFIG}']\nmodel = dict(pts_neck=dict(type='NoSuchNeck'))\n")
    args = ["build", str(config), str(pillar_ckpt), "--out", str(tmp_path / "cache"),
            *cfg_option_args(nus_cfg_options(nus_one))]
    failed = subprocess.run(FEATCACHE + args, capture_output=True, text=True)
    assert failed.returncode == 1 and "broken_teacher.py" in failed.stderr and "NoSuchNeck" in failed.stderr


# -- options are checked before any model, dataset or teacher work ------------------------------
def _build_before_any_model(monkeypatch, args: list[str]):
    """``featcache build ARGS`` in this process, with the teacher's config, dataset and model builders replaced by
    ones that fail the test: an option refused after any of them ran is a late check, whatever the time it took."""
    from click.testing import CliRunner

    from featcache.cli import main
    from featcache.teacher import detector, models

    def built(*_args, **_kwargs):
        raise AssertionError("the teacher's config, dataset or model was built before the options were checked")

    for owner, name in ((models, "load_config"), (models, "build_dataset"), (models, "build_model"),
                        (detector.Teacher, "__init__")):
        monkeypatch.setattr(owner, name, built)
    return CliRunner().invoke(main, ["build", *args])


def _one_error_line(result, message: str) -> None:
    """The command ended with its own error, on one line naming the culprit, no traceback."""
    assert not isinstance(result.exception, AssertionError), result.exception  # a builder ran: checked too late
    assert result.exit_code in (1, 2), (result.exit_code, result.output)  # 2: click's own checks
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--codec", "nonsense"], "codec 'nonsense' is not of the form <precision>-<compressor>"),
    (["--codec", "pts_neck=fp12-zstd1"], "codec 'fp12-zstd1'"),
    (["--codec", "pts_neck:int8-zstd3,pts_backbone=fp16-lz4"], "--codec item 'pts_neck:int8-zstd3' is not LAYER=CODEC"),
    (["--layers", "pts_neck", "--codec", "pts_head=fp32-none"], "--codec names layer 'pts_head', which --layers does"),
    # score codecs are for class heatmaps only: a feature layer (of the detector's own layers too), every layer,
    # or a regression output kind given one is refused before the teacher is built, not once it has run a sample
    (["--codec", "pts_neck=score8-zstd3"],
     "--codec 'pts_neck=score8-zstd3': score8 stores sigmoid scores of class-heatmap logits and would destroy pts_neck"),
    (["--layers", "pts_neck", "--head-outputs", "heatmap", "--codec", "asin8-zstd3"],
     "--codec 'asin8-zstd3': asin8 stores sigmoid scores of class-heatmap logits and would destroy every layer"),
    (["--head-outputs", "heatmap,reg", "--codec", "reg=score8-zstd3"], "would destroy every task's reg output"),
    (["--head-outputs", "heatmap,reg", "--codec", "pts_bbox_head=asin8-zstd3"],
     "would destroy pts_bbox_head's reg outputs"),
    (["--layers", "pts_neck,pts backbone"], "--layers: 'pts backbone' is not a module name"),
    (["--layers", ","], "--layers is empty"),
    (["--cfg-options", "train_dataloader.batch_size"], "--cfg-options item 'train_dataloader.batch_size' is not key=value"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device name"),
    (["--storage-options", "{not json"], "--storage-options"),
    (["--trust-global", "Unqualified"], "--trust-global 'Unqualified' is not module.Name"),
    (["--batch-size", "0"], "--batch-size"),
], ids=["codec", "layer-codec", "codec-item", "codec-layer", "score-codec-layer", "score-codec-every-layer",
        "score-codec-kind", "score-codec-head", "layers", "no-layers", "cfg-options", "device", "storage-options",
        "trust-global", "batch-size"])
def test_a_bad_option_fails_naming_it_before_any_model_is_built(nus_one, pillar_ckpt, tmp_path, monkeypatch, args,
                                                                 message):
    out = tmp_path / "cache"
    result = _build_before_any_model(monkeypatch, [PILLAR_CONFIG, str(pillar_ckpt), "--out", str(out),
                                                   "--num-workers", "0", *cfg_option_args(nus_cfg_options(nus_one)),
                                                   *args])
    _one_error_line(result, message)
    assert not out.exists()  # nothing was created for a build that cannot run


def test_the_options_check_takes_a_score_codec_on_heatmaps(nus_one, pillar_ckpt, tmp_path, monkeypatch):
    # the counterpart: heatmaps named by kind or by the head (only heatmaps asked for) pass the options' check and
    # reach the teacher's set-up (here the replaced builders, which end the command)
    for codec in ("heatmap=score8-zstd3", "pts_bbox_head=asin8-zstd3,pts_neck=fp16-zstd1"):
        result = _build_before_any_model(monkeypatch, [PILLAR_CONFIG, str(pillar_ckpt), "--out", str(tmp_path / "c"),
                                                       "--head-outputs", "heatmap", "--codec", codec,
                                                       *cfg_option_args(nus_cfg_options(nus_one))])
        assert isinstance(result.exception, AssertionError), (codec, result.output)


def test_missing_config_and_checkpoint_fail_before_any_model_work(pillar_ckpt, tmp_path, monkeypatch):
    for config, ckpt, message in ((str(tmp_path / "no_such_teacher.py"), str(pillar_ckpt), "no_such_teacher.py' not found"),
                                  (PILLAR_CONFIG, str(tmp_path / "gone.pth"), "gone.pth' does not exist")):
        result = _build_before_any_model(monkeypatch, [config, ckpt, "--out", str(tmp_path / "cache")])
        _one_error_line(result, message)
        assert result.exit_code == 1



def test_the_codec_check_decides_what_the_options_say_and_the_rest_once_the_model_is_built():
    from featcache.errors import ConfigError
    from featcache.teacher.options import check_codec_option

    reg = "pts_bbox_head.task_heads.0.reg"
    built = {"pts_bbox_head.task_heads.0.heatmap": "heatmap", reg: "reg"}  # the head output layers, by kind
    modules = ["pts_neck", *built]  # verify --repair's --layers: the head output layers among them
    # before the model: a head output layer's kind is not known yet, so naming one is left to the second check
    for text in (f"{reg}=asin8-zstd3", "pts_bbox_head.task_heads.0.heatmap=asin8-zstd3,pts_neck.0=int8-zstd3"):
        check_codec_option(text, modules, ("heatmap", "reg"))
    check_codec_option("pts_bbox_head=score8-zstd3", None, ("heatmap",))  # only heatmaps asked for
    # once it is built, the kinds decide
    with pytest.raises(ConfigError, match=f"asin8 stores sigmoid scores.*would destroy {reg};"):
        check_codec_option(f"{reg}=asin8-zstd3", modules, ("heatmap", "reg"), built)
    with pytest.raises(ConfigError, match=f"would destroy {reg};"):
        check_codec_option("pts_bbox_head=asin8-zstd3", modules, ("heatmap", "reg"), built)
    check_codec_option("pts_bbox_head.task_heads.0.heatmap=asin8-zstd3,pts_neck.0=int8-zstd3", modules,
                       ("heatmap", "reg"), built)
    # a feature layer is one whatever is known: refused before the model, with or without --layers
    for layers in (None, ["pts_neck"]):
        with pytest.raises(ConfigError, match="would destroy pts_neck.0;"):
            check_codec_option("pts_neck.0=score8-zstd3", layers, ("heatmap",))
