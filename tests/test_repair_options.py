"""``verify --repair`` rebuilds damaged rows with the options the cache's manifest records
(``BuildOptions.from_manifest``): its layers, each layer's codec, head outputs and their kinds, teacher boxes and
where regression outputs are kept come back as the build made them, through the same option checks as a build."""
from __future__ import annotations

import shutil

from click.testing import CliRunner

from featcache.cli import main
from featcache.reader import open_cache
from featcache.teacher.options import BuildOptions
from lidar_fixtures import PILLAR_CONFIG, assert_same_cache, cfg_option_args, chunk_file, nus_cfg_options


def test_a_head_output_cache_is_repaired_with_the_options_it_was_built_with(tmp_path, nus_one, pillar_ckpt):
    from featcache.teacher.build import build_cache

    out, original = tmp_path / "cache", tmp_path / "original"
    # a score codec on the heatmaps (not their default) and boxes: what the manifest must give back
    build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_neck", head_outputs="all",
                             boxes=True, codec="heatmap=score8-zstd3", cfg_options=nus_cfg_options(nus_one),
                             num_workers=0, progress=False))
    shutil.copytree(out, original)

    manifest = open_cache(out).manifest
    options = BuildOptions.from_manifest(manifest, str(out), [0], cfg_options={"extra.key": 1})
    assert set(options.head_outputs.split(",")) == {"heatmap", "reg", "height", "dim", "rot", "vel"}
    assert options.boxes and not options.dense_head_outputs
    assert options.max_boxes == manifest.boxes.capacity and options.layers == manifest.extra["modules"]
    assert options.cfg_options == {**nus_cfg_options(nus_one), "extra.key": 1}  # the build's, the given on top
    heatmap = "pts_bbox_head.task_heads.0.heatmap"
    assert f"{heatmap}=score8-zstd3" in options.codec.split(",")
    options.validate()  # per-layer codecs naming head output layers pass the check made before any model work

    chunk_file(out, heatmap, 0).unlink()
    result = CliRunner().invoke(main, ["verify", str(out), "--repair", *cfg_option_args(nus_cfg_options(nus_one))])
    assert result.exit_code == 0, result.output
    assert "repaired 1 samples" in result.output
    assert_same_cache(out, original)
    assert open_cache(out).manifest.layer(heatmap).codec.name == "score8-zstd3"
