"""The teacher's own code is part of a cache's identity, and a teacher that produces nothing is not
cached silently: on the real CenterPoint-pillar model, the real nuScenes scan and a custom_imports
plugin (as projects/BEVFusion is one)."""
from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from featcache import format
from featcache.teacher import build as build_module, models
from featcache.teacher.build import BuildOptions, build_cache
from featcache.teacher.options import resolve_config_path
from featcache.errors import CacheMismatchError
from featcache.inspection import describe
from featcache.reader import open_cache
from featcache.verify import verify_cache
from lidar_fixtures import PILLAR_CONFIG, nus_cfg_options

SCATTER = """
from mmdet3d.models.middle_encoders import PointPillarsScatter
from mmdet3d.registry import MODELS


@MODELS.register_module(force=True)
class {name}(PointPillarsScatter):
    def forward_batch(self, voxel_features, coors, batch_size):
        return super().forward_batch(voxel_features, {coors}, batch_size)
"""
RIGHT = "coors"  # (batch, z, y, x), what PointPillarsScatter reads
REVERSED = "coors.flip(1)"  # (x, y, z, batch): an op mapped with its coordinates in the other order


def _plugin_config(tmp_path: Path, monkeypatch, name: str, coors: str) -> Path:
    """A teacher config whose middle encoder comes from the custom_imports module ``name``."""
    (tmp_path / f"{name.lower()}.py").write_text(textwrap.dedent(SCATTER.format(name=name, coors=coors)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name.lower(), raising=False)
    config = tmp_path / f"teacher_{name.lower()}.py"
    config.write_text(f"_base_ = [{str(resolve_config_path(PILLAR_CONFIG))!r}]\n"
                      f"custom_imports = dict(imports=[{name.lower()!r}], allow_failed_imports=False)\n"
                      f"model = dict(pts_middle_encoder=dict(type={name!r}))\n")
    return config


def _options(config: Path, ckpt: Path, data: Path, out: Path, **overrides) -> BuildOptions:
    values = dict(teacher_config=str(config), checkpoint=str(ckpt), out=str(out), layers="pts_middle_encoder",
                  cfg_options=nus_cfg_options(data), num_workers=0, progress=False)
    return BuildOptions(**{**values, **overrides})


def test_teacher_code_is_part_of_the_identity(tmp_path, monkeypatch, nus_one, pillar_ckpt, caplog, capsys):
    config = _plugin_config(tmp_path, monkeypatch, "FeatcacheIdentityScatter", RIGHT)
    out = tmp_path / "cache"
    result = build_cache(_options(config, pillar_ckpt, nus_one, out, progress=True))
    assert result.written == 1 and not result.nearly_zero_layers
    assert "1/1" in capsys.readouterr().err  # the set-up's sample is counted by the progress bar
    manifest = open_cache(out).manifest
    source = "featcacheidentityscatter.py"
    assert manifest.teacher_code["modules"] == ["featcacheidentityscatter"]
    assert manifest.teacher_code["files"][source] == format.sha256_file(str(tmp_path / source))
    assert {"torch", "mmcv", "mmdet3d", "spconv"} <= set(manifest.versions)
    assert 0.001 < result.nonzero["pts_middle_encoder"]["mean"] < 1

    # other library versions: the resume goes on, with a warning naming them
    versions = build_module.library_versions()
    monkeypatch.setattr(build_module, "library_versions", lambda: {**versions, "torch": "0.0.1"})
    with caplog.at_level(logging.WARNING, logger="featcache.teacher.build"):
        resumed = build_cache(_options(config, pillar_ckpt, nus_one, out))
    assert resumed.written == 0 and resumed.already_complete == 1
    assert f"torch {versions['torch']} -> 0.0.1" in caplog.text
    monkeypatch.undo()

    # the teacher's code changed (the coordinate order fixed or broken): the resume is refused by file
    config = _plugin_config(tmp_path, monkeypatch, "FeatcacheIdentityScatter", REVERSED)
    with pytest.raises(CacheMismatchError, match=rf"(?s)teacher source {source}: changed.*--force"):
        build_cache(_options(config, pillar_ckpt, nus_one, out))
    assert verify_cache(str(out)).ok  # the refusal touched nothing
    rebuilt = build_cache(_options(config, pillar_ckpt, nus_one, out, force=True))
    assert rebuilt.written == 1
    assert open_cache(out).manifest.teacher_code["files"][source] == format.sha256_file(str(tmp_path / source))


def test_a_layer_of_zeros_warns_at_build_and_is_flagged_by_verify_and_inspect(tmp_path, monkeypatch, nus_six,
                                                                              pillar_ckpt, caplog):
    config = _plugin_config(tmp_path, monkeypatch, "FeatcacheReversedScatter", REVERSED)
    out = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="featcache.teacher.build"):
        result = build_cache(_options(config, pillar_ckpt, nus_six, out, layers="pts_middle_encoder,pts_neck"))
    # nothing is scattered where the backbone looks, so the neck's output (BN + ReLU of zeros) is empty too
    assert result.written == 6 and set(result.nearly_zero_layers) == {"pts_middle_encoder", "pts_neck.0"}
    assert "layer pts_middle_encoder is (nearly) all zeros in every one of the 6 samples" in caplog.text
    recorded = open_cache(out)._open().attrs[format.NONZERO_ATTRIBUTE]
    assert recorded["pts_middle_encoder"]["samples"] == 6
    assert recorded["pts_middle_encoder"]["max"] < format.NEAR_ZERO_FRACTION

    report = verify_cache(str(out))
    assert report.ok and report.nonzero_checked == 6 and set(report.nearly_zero) == {"pts_middle_encoder", "pts_neck.0"}
    assert "suspect: layer pts_middle_encoder is (nearly) all zeros in every one of the 6 samples checked" \
        in report.summary()
    text = describe(str(out))
    assert "suspect: layer pts_middle_encoder" in text and "suspect: layer pts_neck.0" in text


def test_the_real_teacher_is_not_flagged(reference_cache):
    report = verify_cache(reference_cache)
    assert report.ok and report.nonzero_checked == 6 and not report.nearly_zero
    assert "suspect" not in describe(reference_cache)
    values = open_cache(reference_cache).read_row(0)
    assert np.count_nonzero(values["pts_middle_encoder"]) / values["pts_middle_encoder"].size > 10 * format.NEAR_ZERO_FRACTION
