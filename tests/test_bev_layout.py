"""BEV layouts: which array axis of a teacher map is x, found by the build from the scan itself, recorded in the
manifest and used by the trainer, so a rows = x teacher (BEVFusion's layout) teaches what a rows = y one does.

The rows = x teachers are real mmdet3d CenterPoints whose maps leave every module transposed
(tests/transposed_teacher.py): same weights, same arithmetic, maps stored as BEVFusion stores them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache import layout as layouts
from featcache.teacher import models
from featcache.teacher.build import BuildOptions, build_cache
from featcache.errors import CacheMismatchError, ConfigError
from featcache.inspection import describe
from featcache.reader import open_cache
from featcache.teacher.detector import Teacher
from featcache.teacher.options import resolve_config_path
from lidar_fixtures import KITTI_CONFIG, PILLAR_CONFIG, REPO, kitti_cfg_options, make_kitti_like, nus_cfg_options

HALF = str(REPO / "configs/students/centerpoint_pillar_half_nus.py")
SLIM = str(REPO / "configs/demo/student_slim.py")


def transposed_config(directory: Path, reverse_rows: bool = False) -> str:
    """The pillar teacher's config with its detector laid out rows = x (optionally with y reversed)."""
    base = resolve_config_path(PILLAR_CONFIG)
    path = directory / f"transposed_{'reversed' if reverse_rows else 'plain'}.py"
    path.write_text(f"_base_ = [{str(base)!r}]\n"
                    "custom_imports = dict(imports=['transposed_teacher'], allow_failed_imports=False)\n"
                    f"model = dict(type='TransposedBEVCenterPoint', reverse_rows={reverse_rows})\n")
    return str(path)


def student_options(data_root: Path) -> dict:
    return {"train_dataloader.dataset.data_root": f"{data_root}/", "train_dataloader.dataset.ann_file": "infos.pkl",
            "train_dataloader.num_workers": 0, "train_dataloader.persistent_workers": False}


@pytest.fixture(scope="module")
def layout_caches(tmp_path_factory, nus_six, pillar_ckpt) -> dict[str, str]:
    """The same pillar teacher's neck, scatter, heatmaps and regression outputs (at GT centres; the seeded
    teacher's own boxes are not finite) cached as mmdet3d lays them out
    (yx), transposed (xy, BEVFusion's) and transposed with y reversed (x-y)."""
    directory = tmp_path_factory.mktemp("layouts")
    configs = {"yx": PILLAR_CONFIG, "xy": transposed_config(directory), "x-y": transposed_config(directory, True)}
    caches = {}
    for name, config in configs.items():
        out = directory / f"cache_{name}"
        result = build_cache(BuildOptions(config, str(pillar_ckpt), str(out), layers="pts_middle_encoder,pts_neck",
                                          head_outputs="heatmap,reg", codec="fp32-none",
                                          cfg_options=nus_cfg_options(nus_six), num_workers=0, progress=False))
        assert result.written == 6 and not result.invalid_keys
        caches[name] = str(out)
    return caches


def test_layouts_parse_and_map_cells_consistently():
    assert layouts.BevLayout.parse("yx") == layouts.CANONICAL and layouts.BevLayout.parse("xy") == layouts.BEVFUSION
    assert layouts.BevLayout.parse("x-y") == layouts.BevLayout("+x", "-y")
    for bad in ("xx", "zy", "y", "yx,", "+-yx"):
        with pytest.raises(ConfigError, match="is not one of yx"):
            layouts.BevLayout.parse(bad)
    canonical = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)  # (C, ny=4, nx=5)
    ys, xs = np.meshgrid(np.arange(4), np.arange(5), indexing="ij")
    for layout in layouts.CANDIDATES:
        assert layouts.BevLayout.parse(layout.name) == layout
        stored = layout.from_canonical(canonical)
        assert np.array_equal(layout.to_canonical(stored), canonical)
        assert stored.shape[-2:] == ((5, 4) if layout.transposed else (4, 5))
        col, row = layout.stored_pixels(xs, ys, stored.shape[-2:])
        assert np.array_equal(stored[:, row, col], canonical), layout.name
    with pytest.raises(ConfigError, match="names layer 'pts_neck' twice"):
        layouts.parse_layout_option("pts_neck=xy,pts_neck=yx")
    with pytest.raises(ConfigError, match="--bev-layout item 'pts_neck:xy' is not LAYER=LAYOUT"):
        layouts.parse_layout_option("pts_neck:xy,pts_backbone=yx")
    stated = layouts.parse_layout_option("pts_neck=xy,pts_bbox_head=x-y")
    assert layouts.stated_layout(stated, "pts_neck.0") == layouts.BEVFUSION
    assert layouts.stated_layout(stated, "pts_bbox_head.task_heads.0.heatmap") == layouts.BevLayout("+x", "-y")
    assert layouts.stated_layout(stated, "pts_backbone.0") is None
    assert layouts.stated_layout(layouts.parse_layout_option("xy"), "anything") == layouts.BEVFUSION


@pytest.mark.parametrize("dataset", ["nuscenes", "kitti"])
def test_every_layout_is_found_on_real_scans(dataset, tmp_path, nus_one, pillar_ckpt, shared_data):
    """Each of the 8 layouts a BEV map can have is told apart on the real scans, for the scatter, the backbone
    and the neck of real mmdet3d teachers (square nuScenes and non-square KITTI grids)."""
    if dataset == "nuscenes":
        config, ckpt, options = PILLAR_CONFIG, str(pillar_ckpt), nus_cfg_options(nus_one)
    else:
        from lidar_fixtures import teacher_checkpoint

        config, ckpt = KITTI_CONFIG, str(teacher_checkpoint(tmp_path, KITTI_CONFIG, seed=1))
        options = kitti_cfg_options(make_kitti_like(tmp_path / "kitti"))
    teacher = Teacher(config, ckpt, None, cfg_options=options)
    _, _, batch = next(iter(teacher.loader([0])))
    maps = {name: value[0] for name, value in teacher.features(batch).items()}
    points = batch["inputs"]["points"][0][:, :2].numpy()
    extent = [teacher.cfg.point_cloud_range[i] for i in (0, 1, 3, 4)]
    assert len(maps) >= 3
    for layout in layouts.CANDIDATES:
        stored = {name: np.ascontiguousarray(layout.from_canonical(value)) for name, value in maps.items()}
        found, lines, warnings = layouts.decide_layouts(stored, points, extent)
        assert not warnings, warnings
        for name in maps:
            assert layouts.BevLayout.from_dict(found[name]) == layout, (layout.name, name, lines)
            assert found[name]["found"] == "measured", lines
            evidence = layouts.weigh(found[name]["evidence"])
            assert evidence.decisive and evidence.score > 0.2, (layout.name, name, evidence.describe())


def test_layouts_are_measured_recorded_and_shown(layout_caches):
    for name, location in layout_caches.items():
        manifest = open_cache(location).manifest
        for layer in manifest.layers:
            assert layer.bev_layout == layouts.BevLayout.parse(name), (name, layer.name, layer.layout)
            assert layer.layout["found"].startswith("measured"), layer.layout
        text = describe(location)
        expected = layouts.BevLayout.parse(name)
        assert f"BEV layout   {expected.name} ({expected.describe()}), measured: pts_middle_encoder [" in text
    # the stored maps are the untransposed teacher's, transposed, bit for bit
    plain, transposed = open_cache(layout_caches["yx"]), open_cache(layout_caches["xy"])
    key = plain.row_keys[0]
    for layer, value in plain[key].items():
        assert torch.equal(transposed[key][layer], value.transpose(-1, -2)), layer


def _kd_losses(cfg, dataset_indices=(0, 3)) -> dict[str, float]:
    from mmdet3d.registry import MODELS
    from mmengine.dataset import pseudo_collate

    torch.manual_seed(0)
    np.random.seed(0)
    model = MODELS.build(cfg.model)
    dataset = models.build_dataset(models.unwrap_dataset_cfg(cfg.train_dataloader.dataset))
    np.random.seed(1)  # the same augmentation (rotation, flips, scaling) of the same scans for every cache
    torch.manual_seed(1)
    batch = model.data_preprocessor(pseudo_collate([dataset[index] for index in dataset_indices]), True)
    losses = model.loss(batch["inputs"], batch["data_samples"])
    return {key: float(value) for key, value in losses.items() if key.startswith(("loss_kd_", "kd_valid"))}


KD = {"mse": 1.0, "infonce": 1.0, "heatmap": 1.0, "reg": 1.0}


def test_a_transposed_teacher_gives_the_student_the_same_targets(layout_caches, nus_six, pillar_ckpt, tmp_path):
    """Cached: the rows = x caches (and the one with y reversed) give every term the losses of the rows = y cache,
    on augmented samples (the warp, the sparse reads, the heatmap and the regression reads at box centres).
    Online: the transposed teacher run live gives the losses of the plain one."""
    from trainer.train import TrainOptions, build_runner_config

    losses = {}
    for name, location in layout_caches.items():
        cfg = build_runner_config(TrainOptions(HALF, location, kd=KD, cfg_options=student_options(nus_six)))
        assert cfg.model.teacher_layouts["pts_neck.0"] == layouts.BevLayout.parse(name).name
        losses[name] = _kd_losses(cfg)
    kd_keys = [key for key in losses["yx"] if key.startswith("loss_kd_")]
    assert {key.split("_")[2] for key in kd_keys} == set(KD), kd_keys
    for name in ("xy", "x-y"):
        for key in losses["yx"]:
            assert losses[name][key] == pytest.approx(losses["yx"][key], rel=1e-5, abs=1e-6), (name, key)
    online = {}
    for name, config in (("yx", PILLAR_CONFIG), ("xy", transposed_config(tmp_path))):
        cfg = build_runner_config(TrainOptions(HALF, None, kd={"mse": 1.0, "heatmap": 1.0}, pairs={"pts_neck.0": "pts_neck.0"},
                                               online_teacher=(config, str(pillar_ckpt)),
                                               cfg_options=student_options(nus_six)))
        assert cfg.model.teacher_layouts["pts_neck.0"] == name
        online[name] = _kd_losses(cfg)
    for key in online["yx"]:
        assert online["xy"][key] == pytest.approx(online["yx"][key], rel=1e-5, abs=1e-6), key


def test_a_wrong_layout_is_refused_before_training(tmp_path, nus_six, pillar_ckpt, caplog):
    """A transposed teacher built with the wrong layout stated: the build says the points disagree, and the
    check before training refuses the pair (the map agrees with the scans better transposed), unless forced."""
    import logging

    from trainer.train import TrainOptions, build_runner_config

    out = tmp_path / "stated_wrong"
    with caplog.at_level(logging.WARNING, logger="featcache.teacher.build"):
        build_cache(BuildOptions(transposed_config(tmp_path), str(pillar_ckpt), str(out), layers="pts_middle_encoder",
                                 bev_layout="yx", cfg_options=nus_cfg_options(nus_six), num_workers=0, progress=False))
    assert any("--bev-layout states yx, but the points" in record.getMessage() for record in caplog.records)
    layer = open_cache(out).manifest.layer("pts_middle_encoder")
    assert layer.layout["found"] == "stated" and layer.bev_layout == layouts.CANONICAL
    options = dict(kd={"mse": 1.0}, cfg_options=student_options(nus_six))
    with pytest.raises(ConfigError, match=r"pts_middle_encoder <- pts_middle_encoder: the teacher map agrees with the "
                                          r"scan better transposed \(correlation"):
        build_runner_config(TrainOptions(HALF, str(out), **options))
    assert build_runner_config(TrainOptions(HALF, str(out), force_alignment=True, **options)).model.type == "CacheDistiller"
    # a stated layout the cache contradicts makes a resume refuse
    with pytest.raises(CacheMismatchError, match="bev layout of pts_middle_encoder: cache has yx, --bev-layout states xy"):
        build_cache(BuildOptions(transposed_config(tmp_path), str(pillar_ckpt), str(out), layers="pts_middle_encoder",
                                 bev_layout="xy", cfg_options=nus_cfg_options(nus_six), num_workers=0, progress=False))


def test_the_check_before_training_reports_agreement_of_every_pair(layout_caches, nus_six, caplog):
    import logging

    from trainer.train import TrainOptions, build_runner_config

    with caplog.at_level(logging.INFO, logger="trainer.alignment_check"):
        build_runner_config(TrainOptions(HALF, layout_caches["xy"], kd={"mse": 1.0},
                                         cfg_options=student_options(nus_six)))
    lines = [record.getMessage() for record in caplog.records if record.name == "trainer.alignment_check"]
    scatter = next(line for line in lines if line.startswith("alignment check: pts_middle_encoder <- "))
    assert "(layout xy): occupancy IoU" in scatter
    iou, transposed = (float(value) for value in
                       __import__("re").search(r"occupancy IoU ([\d.]+), .*transposed ([\d.]+)", scatter).groups())
    assert iou > 0.5 and iou > 2 * transposed, scatter


def test_the_students_grid_comes_from_its_model():
    from trainer.grids import student_bev_range

    cfg = models.load_config(SLIM)
    assert student_bev_range(cfg, SLIM) == [-32.0, -32.0, 32.0, 32.0]
    wider = models.load_config(SLIM, {"point_cloud_range": [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]})
    with pytest.raises(ConfigError, match=r"placed by model\.data_preprocessor\.voxel_layer\.point_cloud_range = "
                                          r"\[-32\.0, -32\.0, -5\.0, 32\.0, 32\.0, 3\.0\], but point_cloud_range "
                                          r"\(top level\) = \[-51\.2"):
        student_bev_range(wider, SLIM)


def test_a_bevfusion_cache_without_layouts_is_refused(layout_caches):
    from trainer.grids import cache_layouts

    manifest = open_cache(layout_caches["yx"]).manifest
    legacy = dataclasses.replace(manifest, layers=tuple(dataclasses.replace(layer, layout=None)
                                                       for layer in manifest.layers))
    assert set(cache_layouts(legacy, legacy.layers, "old").values()) == {"yx"}
    bevfusion = dataclasses.replace(legacy, teacher_config=legacy.teacher_config + "\nmodel = dict(type='BEVFusion')")
    with pytest.raises(CacheMismatchError, match="built by a BEVFusion teacher before featcache recorded BEV layouts"):
        cache_layouts(bevfusion, bevfusion.layers, "old")
    assert "not recorded (cache written before featcache recorded layouts)" in "\n".join(
        __import__("featcache.inspection", fromlist=["layout_lines"]).layout_lines(legacy))
    assert json.loads(json.dumps(manifest.to_dict()))["layers"][0]["layout"]["rows"] == "+y"


def test_the_warp_reads_every_layout_as_the_canonical_map():
    """BevAlignment on a map stored in any layout gives the warp, sparse reads, pooled reads and centre cells
    of the same map stored rows = y, under a rotation, flip, scaling and translation, across grids."""
    import math

    from trainer.bev_warp import BevAlignment
    from trainer.targets import TeacherMaps

    generator = torch.Generator().manual_seed(0)
    canonical = torch.rand(4, 36, 36, generator=generator)  # (C, ny, nx) on a 54 m grid
    angle = math.radians(33)
    rotation = torch.tensor([[math.cos(angle), math.sin(angle), 0], [-math.sin(angle), math.cos(angle), 0], [0, 0, 1.0]])
    meta = {"transformation_3d_flow": ["R", "S", "T", "HF"], "pcd_rotation": rotation, "pcd_scale_factor": 1.04,
            "pcd_trans": [0.7, -1.1, 0.0]}
    teacher_range, student_range, student_hw = [-54.0, -54.0, 54.0, 54.0], [-51.2, -51.2, 51.2, 51.2], (32, 32)
    reference = BevAlignment(teacher_range, (36, 36), student_range, student_hw, meta)
    cells = torch.arange(0, 32 * 32, 7)
    centres = torch.tensor([[3.3, 4.9], [15.5, 16.01], [30.2, 1.7]])
    expected = (reference.warp(canonical), TeacherMaps([canonical]).read(0, reference.read_matrix(cells)))
    ref_cells, ref_on = reference.teacher_cells_of(centres)
    weights = torch.rand(32 * 32, generator=torch.Generator().manual_seed(1))
    for layout in layouts.CANDIDATES:
        stored = layout.from_canonical(canonical).contiguous()
        alignment = BevAlignment(teacher_range, tuple(stored.shape[-2:]), student_range, student_hw, meta,
                                 teacher_layout=layout)
        assert torch.allclose(alignment.warp(stored), expected[0], atol=1e-6), layout.name
        assert torch.allclose(TeacherMaps([stored]).read(0, alignment.read_matrix(cells)), expected[1], atol=1e-6)
        pooled = stored.flatten(1) @ alignment.splat(weights)
        assert torch.allclose(pooled, canonical.flatten(1) @ reference.splat(weights), atol=1e-4), layout.name
        teacher_cells, on_grid = alignment.teacher_cells_of(centres)
        assert torch.equal(teacher_cells, ref_cells) and torch.equal(on_grid, ref_on)
        flat = alignment.teacher_flat_index(teacher_cells[on_grid])
        assert torch.equal(stored.flatten(1)[:, flat], canonical[:, ref_cells[ref_on, 1], ref_cells[ref_on, 0]])
