"""Response and label targets in the cache: the teacher's dense CenterHead outputs as layers described
in the manifest (`featcache build --head-outputs`) and its decoded predictions (`--boxes`), on
mmdet3d's CenterPoint-pillar nuScenes config and the real nuScenes scan."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from featcache import boxes, codecs, format, head_layers
from featcache.teacher import heads, models
from featcache.teacher.build import BuildOptions, build_cache
from featcache.teacher.samples import annotated_centres
from featcache.errors import CacheMismatchError, ConfigError, CorruptSampleError, NoBoxesError
from featcache.export import export_hdf5
from featcache.inspection import describe, nearly_zero_layers, nonzero_fraction, plot_sample
from featcache.reader import open_cache
from featcache.verify import verify_cache
from lidar_fixtures import KITTI_CONFIG, PILLAR_CONFIG, nus_cfg_options

FEATCACHE = [sys.executable, "-m", "featcache.cli"]


@pytest.fixture(scope="module")
def head_cache(tmp_path_factory, nus_one, pillar_ckpt):
    out = tmp_path_factory.mktemp("heads") / "cache"
    result = build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_neck", head_outputs="all",
                                      boxes=True, cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False))
    assert result.written == 1
    return out


def _runner_config(cache, data_root, **train_options):
    """``featcache train``'s runner config for the nuScenes half-width CenterPoint student on ``cache``."""
    from lidar_fixtures import REPO
    from trainer.train import TrainOptions, build_runner_config

    options = {"train_dataloader.dataset.data_root": f"{data_root}/", "train_dataloader.dataset.ann_file": "infos.pkl",
               "train_dataloader.num_workers": 0, "train_dataloader.persistent_workers": False}
    return build_runner_config(TrainOptions(str(REPO / "configs/students/centerpoint_pillar_half_nus.py"), str(cache),
                                            cfg_options=options, **train_options))


def _teacher_head_outputs(pillar_ckpt, data_root) -> list[dict[str, torch.Tensor]]:
    """Reference, computed another way than the build's hooks: the teacher's features through its head's
    own forward, per task."""
    from mmengine.dataset import pseudo_collate

    cfg = models.load_config(PILLAR_CONFIG, nus_cfg_options(data_root))
    model = models.build_model(cfg, str(pillar_ckpt)).eval()
    dataset = models.build_dataset(models.dataset_cfg_for_split(cfg, "train"))
    with torch.no_grad():
        data = model.data_preprocessor(pseudo_collate([dataset[0]]), False)
        _, pts_feats = model.extract_feat(data["inputs"], [s.metainfo for s in data["data_samples"]])
        # multi_apply over feature levels: one list per task, one dict per level (a single level here)
        per_task = [levels[0] for levels in model.pts_bbox_head(pts_feats)]
    return per_task, model.pts_bbox_head


def _annotated_centres(data_root) -> np.ndarray:
    """BEV centres of every annotated box of the fixture's scan (also those without lidar points, which the
    nuScenes dataset leaves out of training with its default filter), read from its info file, not through
    mmdet3d."""
    import pickle

    with open(data_root / "infos.pkl", "rb") as handle:
        (info,) = pickle.load(handle)["data_list"]
    return np.array([instance["bbox_3d"][:2] for instance in info["instances"]])


def test_head_outputs_are_cached_per_task_and_described(head_cache, nus_one, pillar_ckpt):
    cache = open_cache(str(head_cache))
    per_task, head = _teacher_head_outputs(pillar_ckpt, nus_one)
    assert len(per_task) == len(head.class_names) == 6
    names = cache.layer_names
    assert names[0] == "pts_neck.0"
    expected = [f"pts_bbox_head.task_heads.{task}.{kind}" for task in range(6) for kind in head_layers.CENTERHEAD_OUTPUTS]
    assert sorted(names[1:]) == sorted(expected)  # in the order the head runs them
    (key,) = cache.keys()
    row = cache.read(key)
    # the cells of the annotated boxes' centres (every one of the scan's, read from its info file here) and of
    # the cached teacher boxes' centres
    centres = np.concatenate([_annotated_centres(nus_one), cache.teacher_boxes(key).bboxes[:, :2]])
    extent = cache.manifest.extra["point_cloud_range"]
    kept_cells = {(128, 128): head_layers.centre_cells(centres, [extent[0], extent[1], extent[3], extent[4]], (128, 128))}
    assert 0 < kept_cells[(128, 128)].mean() < 0.05 and cache.manifest.regression_cells["margin"] == head_layers.CENTRE_MARGIN
    for task, outputs in enumerate(per_task):
        for kind in head_layers.CENTERHEAD_OUTPUTS:
            layer = cache.manifest.layer(f"pts_bbox_head.task_heads.{task}.{kind}")
            assert layer.is_head_output and layer.kind == kind and layer.codec == head_layers.default_codec(kind)
            reference = outputs[kind][0].numpy()
            assert layer.shape == reference.shape
            if kind == "heatmap":  # asin8: every sigmoid score within pi/1020 (the terms compare scores)
                assert layer.codec.precision == "asin8"
                scores = 1 / (1 + np.exp(-reference.astype(np.float64)))
                error = np.abs(1 / (1 + np.exp(-row[layer.name].astype(np.float64))) - scores)
                assert error.max() <= np.pi / 1020 + 1e-6
                # and finer towards 0 and 1 (where score8 is 1/510 everywhere): a half step of the angle moves
                # sin^2 by at most (sin 2θ + step) * sin(step); the end codes' clamp adds up to 1e-4
                step = np.pi / 1020
                bound = np.maximum((2 * np.sqrt(scores * (1 - scores)) + step) * np.sin(step), codecs.SCORE8_FLOOR)
                assert (error <= bound + 1e-6).all()
            else:  # fp16 keeps ~3 significant digits of every value, at the box centres' cells; 0 elsewhere
                assert layer.codec.precision == "fp16" and layer.meaning["cells"] == head_layers.CELLS_AT_CENTRES
                kept = kept_cells[reference.shape[-2:]]
                np.testing.assert_allclose(row[layer.name][:, kept], reference[:, kept], rtol=2e-3, atol=2e-3)
                assert not row[layer.name][:, ~kept].any()
            meaning = layer.meaning
            assert meaning["kind"] == kind and meaning["task"] == task and meaning["head_type"] == "CenterHead"
            assert meaning["classes"] == list(head.class_names[task])
            assert len(meaning["channels"]) == reference.shape[0]
        assert cache.manifest.layer(f"pts_bbox_head.task_heads.{task}.heatmap").meaning["stored"] == "logits"
    assert cache.manifest.layer("pts_bbox_head.task_heads.0.heatmap").meaning["channels"] == ["car"]
    assert cache.manifest.layer("pts_bbox_head.task_heads.0.rot").meaning["channels"] == ["sin_yaw", "cos_yaw"]
    assert cache.manifest.layer("pts_bbox_head.task_heads.0.dim").meaning["channels"] == ["log_l", "log_w", "log_h"]
    assert cache.manifest.layer("pts_neck.0").meaning is None and cache.manifest.layer("pts_neck.0").kind == "feature"
    assert cache.manifest.layer("pts_neck.0").codec == codecs.DEFAULT_CODEC
    assert verify_cache(str(head_cache)).ok


def test_centre_cells_hold_each_centre_and_the_neighbour_across_a_near_edge():
    extent, hw = [0.0, -2.0, 4.0, 2.0], (4, 8)  # cells 0.5 m wide (x), 1 m high (y)
    kept = head_layers.centre_cells(np.array([[1.25, 0.5]]), extent, hw)
    assert np.argwhere(kept).tolist() == [[2, 2]]  # (y, x): floor((0.5 + 2) / 1), floor(1.25 / 0.5)
    # 0.002 m from the edge x = 1.5 (0.004 cells, within the margin): both cells; 0.5 cells off it: one
    kept = head_layers.centre_cells(np.array([[1.502, 0.5], [3.75, -1.5]]), extent, hw)
    assert np.argwhere(kept).tolist() == [[0, 7], [2, 2], [2, 3]]
    # a corner within the margin in both axes: the four cells around it; off the grid: nothing
    kept = head_layers.centre_cells(np.array([[2.001, 0.005], [-0.1, 0.0], [4.2, 0.0]]), extent, hw)
    assert np.argwhere(kept).tolist() == [[1, 3], [1, 4], [2, 3], [2, 4]]
    assert not head_layers.centre_cells(np.zeros((0, 2)), extent, hw).any()


def test_annotated_centres_are_every_box_of_the_annotation_file_whatever_the_datasets_classes(nus_one):
    # a car-only dataset and its no-points filter keep 8 of the scan's 69 boxes for training; the centres the
    # regression outputs are kept at are all 69 (a student may train on other classes), in the boxes' frame
    cfg = models.load_config(PILLAR_CONFIG, nus_cfg_options(nus_one))
    dataset = models.build_dataset({**models.dataset_cfg_for_split(cfg, "train"), "metainfo": {"classes": ["car"]}})
    counted = list(dataset.num_ins_per_cat)
    (centres,) = annotated_centres(dataset)
    np.testing.assert_allclose(centres, _annotated_centres(nus_one), atol=1e-5)
    assert len(centres) == 69 and dataset.num_ins_per_cat == counted  # the dataset's own statistics untouched
    assert len(dataset.get_data_info(0)["eval_ann_info"]["gt_bboxes_3d"]) < 69


@pytest.fixture(scope="module")
def dense_head_cache(tmp_path_factory, nus_one, pillar_ckpt):
    out = tmp_path_factory.mktemp("dense") / "cache"
    build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_neck", head_outputs="all",
                             boxes=True, dense_head_outputs=True, cfg_options=nus_cfg_options(nus_one), num_workers=0,
                             progress=False))
    return out


def test_regression_outputs_are_kept_at_box_centres_and_cost_a_fraction_of_the_dense_maps(head_cache,
                                                                                         dense_head_cache):
    # (that the reg term reads the same targets from either: tests/test_response_targets.py, a trained teacher)
    from featcache import store

    masked, dense = open_cache(str(head_cache)), open_cache(str(dense_head_cache))
    assert dense.manifest.regression_cells is None and masked.manifest.regression_cells["at"] == head_layers.CELLS_AT_CENTRES
    (key,) = masked.keys()
    stored, full = masked.read(key), dense.read(key)
    regression = [layer for layer in masked.manifest.layers if layer.kind in head_layers.REGRESSION_OUTPUTS]
    assert len(regression) == 30
    kept = np.zeros(regression[0].shape[-2:], dtype=bool)
    for layer in regression:  # the same teacher values where kept, zero elsewhere
        cells = (stored[layer.name] != 0).any(axis=0)
        kept |= cells
        np.testing.assert_array_equal(stored[layer.name][:, cells], full[layer.name][:, cells])
        assert dense.manifest.layer(layer.name).meaning["cells"] == head_layers.CELLS_DENSE
    assert 0 < kept.mean() < 0.05
    # what that saves: the masked regression maps store a small part of the dense ones' bytes
    def stored_bytes(path, cache):
        group = store.open_group(str(path))
        return sum(store.chunk_nbytes(group[format.feature_path(layer.name)], 0) for layer in regression)
    assert stored_bytes(head_cache, masked) < 0.2 * stored_bytes(dense_head_cache, dense)


def test_a_cache_keeps_its_regression_cells_on_resume_and_says_how(head_cache, dense_head_cache, nus_one, pillar_ckpt):
    def resume(out, dense):
        return BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_neck", head_outputs="all", boxes=True,
                            dense_head_outputs=dense, cfg_options=nus_cfg_options(nus_one), num_workers=0,
                            progress=False)
    with pytest.raises(CacheMismatchError, match="(?s)regression_cells.*resume it with --dense-head-outputs"):
        build_cache(resume(dense_head_cache, False))
    with pytest.raises(CacheMismatchError, match="(?s)regression_cells.*resume it without --dense-head-outputs"):
        build_cache(resume(head_cache, True))
    assert build_cache(resume(dense_head_cache, True)).already_complete == 1
    # a changed annotation file changes the cells kept: a stale cache, refused
    import pickle

    changed = nus_one.parent / "nus_one_moved"
    shutil.copytree(nus_one, changed)
    with open(changed / "infos.pkl", "rb") as handle:
        infos = pickle.load(handle)
    seen = next(box for box in infos["data_list"][0]["instances"] if box["num_lidar_pts"] > 0)  # not filtered out
    seen["bbox_3d"][0] += 3.0
    with open(changed / "infos.pkl", "wb") as handle:
        pickle.dump(infos, handle)
    moved = BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(head_cache), layers="pts_neck", head_outputs="all",
                         boxes=True, cfg_options=nus_cfg_options(changed), num_workers=0, progress=False)
    with pytest.raises(CacheMismatchError, match="(?s)annotated_centres_sha256.*annotations changed"):
        build_cache(moved)


def test_head_output_caches_resume_only_with_the_same_outputs(head_cache, nus_one, pillar_ckpt):
    same = BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(head_cache), layers="pts_neck", head_outputs="all",
                        boxes=True, cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False)
    assert build_cache(same).already_complete == 1
    fewer = BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(head_cache), layers="pts_neck", head_outputs="heatmap",
                         boxes=True, cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False)
    with pytest.raises(CacheMismatchError, match="modules: cache has .*task_heads.0.vel"):
        build_cache(fewer)
    no_boxes = BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(head_cache), layers="pts_neck", head_outputs="all",
                            cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False)
    with pytest.raises(CacheMismatchError, match=r"boxes: cache has \(500, \['x'.*this build has None"):
        build_cache(no_boxes)


def test_head_outputs_option_names_what_is_wrong(tmp_path, pillar_ckpt, nus_one):
    with pytest.raises(ConfigError, match="choose 'all' or some of heatmap, reg.*unknown: heatmaps"):
        BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(tmp_path / "c"), head_outputs="heatmaps").validate()
    with pytest.raises(ConfigError, match="--dense-head-outputs keeps regression outputs.*--head-outputs heatmap "
                                          "records none"):
        BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(tmp_path / "c"), head_outputs="heatmap",
                     dense_head_outputs=True).validate()
    # a head that is not a CenterHead is refused by type, before anything is written
    from lidar_fixtures import kitti_cfg_options, make_kitti_like, save_openmmlab_checkpoint

    kitti = make_kitti_like(tmp_path / "kitti")
    kitti_ckpt = save_openmmlab_checkpoint(models.build_model(models.load_config(KITTI_CONFIG)), tmp_path / "kitti.pth")
    with pytest.raises(ConfigError, match=r"bbox_head \(Anchor3DHead\) is not a CenterHead"):
        build_cache(BuildOptions(KITTI_CONFIG, str(kitti_ckpt), str(tmp_path / "k"), head_outputs="heatmap",
                                 cfg_options=kitti_cfg_options(kitti), num_workers=0, progress=False))
    assert not (tmp_path / "k").exists()
    # --codec may name head outputs; the CLI takes the option
    built = subprocess.run(FEATCACHE + ["build", PILLAR_CONFIG, str(pillar_ckpt), "--out", str(tmp_path / "cli"),
                                        "--layers", "pts_neck", "--head-outputs", "heatmap", "--codec",
                                        "pts_bbox_head=fp32-none", "--num-workers", "0", "--cfg-options",
                                        *[f"{k}={v}" for k, v in nus_cfg_options(nus_one).items()]],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    manifest = open_cache(str(tmp_path / "cli")).manifest
    assert [layer.codec.name for layer in manifest.layers] == ["int8-zstd3"] + ["fp32-none"] * 6
    # score8 holds sigmoid scores of heatmap logits: a feature layer given it is refused before anything is written
    with pytest.raises(ConfigError, match="score8 stores sigmoid scores.*would destroy every layer"):
        build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(tmp_path / "s8"), layers="pts_neck",
                                 head_outputs="heatmap", codec="score8-zstd3", cfg_options=nus_cfg_options(nus_one),
                                 num_workers=0, progress=False))
    assert not (tmp_path / "s8").exists()
    # a head output named by its layer: its kind is known once the model is built (the check before the teacher runs)
    with pytest.raises(ConfigError, match="asin8 stores sigmoid scores.*would destroy pts_bbox_head.task_heads.0.reg"):
        build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(tmp_path / "a8"), layers="pts_neck",
                                 head_outputs="heatmap,reg", codec="pts_bbox_head.task_heads.0.reg=asin8-zstd3",
                                 cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False))
    assert not (tmp_path / "a8").exists()


def test_heatmaps_named_by_kind_take_the_uniform_score_codec(tmp_path, pillar_ckpt, nus_one):
    # --codec heatmap=score8-zstd3: every task's heatmap, and no other layer, on the uniform score grid
    # (the default is asin8: a kind selector that did nothing would pass with it)
    out = tmp_path / "score8"
    build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_neck", head_outputs="heatmap,reg",
                             codec="heatmap=score8-zstd3", cfg_options=nus_cfg_options(nus_one), num_workers=0,
                             progress=False))
    cache = open_cache(str(out))
    per_task, _ = _teacher_head_outputs(pillar_ckpt, nus_one)
    (key,) = cache.keys()
    row = cache.read(key)
    for task, outputs in enumerate(per_task):
        heatmap = cache.manifest.layer(f"pts_bbox_head.task_heads.{task}.heatmap")
        assert heatmap.codec.name == "score8-zstd3" != head_layers.HEATMAP_CODEC.name
        assert cache.manifest.layer(f"pts_bbox_head.task_heads.{task}.reg").codec == head_layers.HEAD_OUTPUT_CODEC
        scores = np.clip(1 / (1 + np.exp(-outputs["heatmap"][0].numpy().astype(np.float64))), 1e-4, 1 - 1e-4)
        read = 1 / (1 + np.exp(-row[heatmap.name].astype(np.float64)))
        assert np.abs(read - scores).max() <= 1 / 510 + 1e-6
    assert cache.manifest.layer("pts_neck.0").codec == codecs.DEFAULT_CODEC
    assert verify_cache(str(out)).ok


def test_training_from_a_head_output_cache_pairs_features_only_unless_told(head_cache, nus_one):
    # head outputs are response targets: feature terms never pick them up by name; --pairs may name them
    cfg = _runner_config(head_cache, nus_one, kd={"pkd": 1.0})
    assert cfg.model.pairs == {"pts_neck.0": "pts_neck.0"}
    pack = next(step for step in cfg.train_dataloader.dataset.pipeline if step["type"] == "PackDetInputsWithCache")
    assert pack["layers"] == ["pts_neck.0"]  # nothing read that no term uses
    heatmap = "pts_bbox_head.task_heads.0.heatmap"
    cfg = _runner_config(head_cache, nus_one, kd={"pkd": 1.0},
                         pairs={heatmap: heatmap})
    assert cfg.model.pairs == {heatmap: heatmap} and cfg.model.teacher_shapes[heatmap] == [1, 128, 128]


def _teacher_predictions(pillar_ckpt, data_root):
    """Reference: mmdet3d's own predict on the sample, outside featcache."""
    from mmengine.dataset import pseudo_collate

    cfg = models.load_config(PILLAR_CONFIG, nus_cfg_options(data_root))
    model = models.build_model(cfg, str(pillar_ckpt)).eval()
    dataset = models.build_dataset(models.dataset_cfg_for_split(cfg, "train"))
    with torch.no_grad():
        (sample,) = model.test_step(pseudo_collate([dataset[0]]))
    return sample.pred_instances_3d, dataset.metainfo["classes"]


def test_teacher_boxes_are_its_predictions_checked_like_features(head_cache, nus_one, pillar_ckpt, tmp_path):
    cache = open_cache(str(head_cache))
    spec = cache.manifest.boxes
    reference, classes = _teacher_predictions(pillar_ckpt, nus_one)
    assert spec.capacity == 500 and spec.fields == boxes.LIDAR_BOX_FIELDS and spec.classes == tuple(classes)
    (key,) = cache.keys()
    cached = cache.teacher_boxes(key)
    order = torch.argsort(-reference.scores_3d, stable=True).numpy()
    assert len(cached) == len(reference.scores_3d) > 0
    np.testing.assert_array_equal(cached.bboxes, reference.bboxes_3d.tensor.numpy()[order])
    np.testing.assert_array_equal(cached.scores, reference.scores_3d.numpy()[order])
    np.testing.assert_array_equal(cached.labels, reference.labels_3d.numpy()[order])
    assert verify_cache(str(head_cache)).ok
    # a damaged or vanished boxes chunk spoils its sample: read and verify name it, nothing else changes
    for damage in ("flip", "delete"):
        copy = tmp_path / damage
        shutil.copytree(head_cache, copy)
        (chunk,) = [path for path in (copy / format.BOXES_ARRAY / "c" / "0").rglob("*") if path.is_file()]
        if damage == "delete":
            chunk.unlink()
        else:
            data = bytearray(chunk.read_bytes())
            data[len(data) // 2] ^= 0xFF
            chunk.write_bytes(bytes(data))
        with pytest.raises(CorruptSampleError, match=f"sample {key!r} .row 0. teacher boxes"):
            open_cache(str(copy)).teacher_boxes(key)
        report = verify_cache(str(copy))
        assert [k for k, _ in report.corrupt] == [key] and report.bad_rows == [0]
        open_cache(str(copy)).read(key)  # the features are intact
    # HDF5 export: the same boxes, checked the same way
    h5 = export_hdf5(str(head_cache), str(tmp_path / "cache.h5"))
    exported = open_cache(h5).teacher_boxes(key)
    np.testing.assert_array_equal(exported.bboxes, cached.bboxes)
    np.testing.assert_array_equal(exported.labels, cached.labels)
    # inspect reports them and draws them
    text = describe(str(head_cache))
    assert f"teacher boxes {len(cached)}.0 per sample" in text and "up to 500 kept" in text
    # with their bytes per sample, as the layers': a table row and the boxes line
    from featcache.inspection import _megabytes

    (chunk,) = [path for path in (head_cache / format.BOXES_ARRAY / "c" / "0").rglob("*") if path.is_file()]
    stored, fp32 = chunk.stat().st_size, 500 * spec.row_shape[1] * 4
    (row,) = [line.split() for line in text.splitlines() if line.startswith("teacher boxes ")
              and "per sample" not in line]
    assert row[2:6] == [f"500x{spec.row_shape[1]}", "float32", "fp32-zstd3", _megabytes(stored)], row
    assert float(row[6]) == pytest.approx(fp32 / stored, abs=0.05)
    assert f"{stored / 1e3:.1f} kB stored per sample ({fp32 / 1e3:.1f} kB as float32)" in text
    assert any(line.startswith("all + boxes") for line in text.splitlines())
    assert plot_sample(cache, key, str(tmp_path / "bev.png")) and (tmp_path / "bev.png").stat().st_size > 10_000


def test_max_boxes_keeps_the_highest_scores_and_says_so(nus_one, pillar_ckpt, tmp_path, caplog):
    out = tmp_path / "few"
    result = build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_neck", boxes=True,
                                      max_boxes=5, cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False))
    reference, _ = _teacher_predictions(pillar_ckpt, nus_one)
    cache = open_cache(str(out))
    (key,) = cache.keys()
    kept = cache.teacher_boxes(key)
    assert len(kept) == 5 and result.truncated_boxes == {key: len(reference.scores_3d) - 5}
    np.testing.assert_array_equal(kept.scores, np.sort(reference.scores_3d.numpy())[::-1][:5])
    assert "lowest-scoring are left out" in caplog.text
    with pytest.raises(NoBoxesError, match="holds no teacher boxes; build it with `featcache build --boxes`"):
        _cache_without_boxes(nus_one, pillar_ckpt, tmp_path)
    with pytest.raises(ConfigError, match="--max-boxes is for --boxes"):
        BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(tmp_path / "x"), max_boxes=5).validate()


def _cache_without_boxes(nus_one, pillar_ckpt, tmp_path):
    out = tmp_path / "plain"
    build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_neck",
                             cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False))
    cache = open_cache(str(out))
    return cache.teacher_boxes(cache.row_keys[0])


def test_heatmap_term_pairs_every_student_task_with_the_cached_heatmaps_and_reads_only_what_it_uses(head_cache,
                                                                                                   nus_one):
    heatmaps = [f"pts_bbox_head.task_heads.{task}.heatmap" for task in range(6)]
    cfg = _runner_config(head_cache, nus_one, kd={"heatmap": 10.0})
    assert cfg.model.pairs == {layer: layer for layer in heatmaps}  # no feature term: no feature pair
    assert cfg.model.heatmap_pairs == {layer: list(range(len(classes))) for layer, classes in
                                       zip(heatmaps, [["car"], ["truck", "construction_vehicle"], ["bus", "trailer"],
                                                      ["barrier"], ["motorcycle", "bicycle"], ["pedestrian",
                                                                                               "traffic_cone"]])}
    pack = next(step for step in cfg.train_dataloader.dataset.pipeline if step["type"] == "PackDetInputsWithCache")
    assert pack["layers"] == heatmaps
    cfg = _runner_config(head_cache, nus_one, kd={"heatmap": 10.0, "pkd": 1.0})
    assert set(cfg.model.pairs) == {"pts_neck.0", *heatmaps} and set(cfg.model.heatmap_pairs) == set(heatmaps)


def test_heatmap_term_on_a_cache_without_heatmaps_says_how_to_build_one(nus_one, pillar_ckpt, tmp_path):
    plain = tmp_path / "plain"
    build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(plain), layers="pts_neck",
                             cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False))
    with pytest.raises(ConfigError, match=f"cache {plain} has none; build it with .*--head-outputs heatmap"):
        _runner_config(plain, nus_one, kd={"heatmap": 10.0})


def test_heatmap_classes_match_by_name_across_task_layouts():
    from trainer.response_pairs import match_by_class

    teacher = [("bbox_head.heatmap", ("car", "truck", "bus", "pedestrian", "barrier"))]  # one 5-class task
    student = [("t0", ("car",)), ("t1", ("pedestrian", "bicycle")), ("t2", ("motorcycle",))]
    assert match_by_class(student, teacher, "cache c") == {"t0": ("bbox_head.heatmap", [0]),
                                                           "t1": ("bbox_head.heatmap", [3, -1])}  # t2: no class shared
    split = [("a", ("car",)), ("b", ("truck",))]
    with pytest.raises(ConfigError, match=r"\['car', 'truck'\] of student layer t0 are split over teacher layers"):
        match_by_class([("t0", ("car", "truck"))], split, "cache c")
    with pytest.raises(ConfigError, match="found no student class among the teacher's head classes"):
        match_by_class([("t0", ("tram",))], teacher, "cache c")


def test_reg_term_pairs_each_tasks_regression_outputs_with_its_classes_labels(head_cache, nus_one):
    cfg = _runner_config(head_cache, nus_one, kd={"heatmap": 10.0, "reg": 1.0})
    kinds = ("reg", "height", "dim", "rot", "vel")
    regression = {f"pts_bbox_head.task_heads.{task}.{kind}" for task in range(6) for kind in kinds}
    assert set(cfg.model.regression_pairs) == regression and len(cfg.model.heatmap_pairs) == 6
    assert set(cfg.model.pairs) == regression | set(cfg.model.heatmap_pairs)  # no feature term: no feature pair
    # labels in CenterHead's order of the tasks' classes: task 1 is (truck, construction_vehicle)
    assert cfg.model.regression_pairs["pts_bbox_head.task_heads.1.rot"] == {"kind": "rot", "labels": [1, 2],
                                                                            "log_dims": True}
    pack = next(step for step in cfg.train_dataloader.dataset.pipeline if step["type"] == "PackDetInputsWithCache")
    assert set(pack["layers"]) == set(cfg.model.pairs.values())


def test_label_kd_adds_the_cached_teacher_boxes_to_the_students_gt(head_cache, nus_one):
    # the pipeline carries the cached boxes beside the GT, moved into the sample's augmented frame; the
    # distiller's step adds the confident ones no GT box explains to the GT the student's loss assigns
    from mmdet3d.registry import MODELS
    from mmengine.dataset import pseudo_collate

    from trainer.transforms import augment_boxes

    cfg = _runner_config(head_cache, nus_one, kd={"label": 1.0, "heatmap": 10.0})
    pack = next(step for step in cfg.train_dataloader.dataset.pipeline if step["type"] == "PackDetInputsWithCache")
    assert pack["teacher_boxes"]["classes"][:2] == ["car", "truck"] and cfg.model.teacher_boxes
    dataset = models.build_dataset(models.unwrap_dataset_cfg(cfg.train_dataloader.dataset))
    sample = dataset[0]["data_samples"]
    cache = open_cache(str(head_cache))
    stored = cache.read_boxes(sample.metainfo["cache_row"])
    teacher = sample.teacher_instances_3d
    assert 0 < len(teacher) <= len(stored)
    from mmdet3d.structures import LiDARInstance3DBoxes

    moved = augment_boxes(LiDARInstance3DBoxes(torch.from_numpy(stored.bboxes), box_dim=stored.bboxes.shape[1]),
                          sample.metainfo)
    # every attached box is a stored box moved by the sample's own recorded augmentation
    distance = torch.cdist(teacher.bboxes_3d.tensor[:, :3], moved.tensor[:, :3], compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert float(distance.max()) < 1e-4

    models.init_mmdet3d_scope()
    model = MODELS.build(cfg.model)
    batch = model.data_preprocessor(pseudo_collate([dataset[0]]), True)
    annotated = len(batch["data_samples"][0].gt_instances_3d.bboxes_3d)
    confident = int((batch["data_samples"][0].teacher_instances_3d.scores_3d >= 0.5).sum())
    losses = model.loss(batch["inputs"], batch["data_samples"])
    added = len(batch["data_samples"][0].gt_instances_3d.bboxes_3d) - annotated
    assert float(losses["kd_label_boxes_per_sample"]) == added and 0 < added <= confident
    assert all(torch.isfinite(value).all() for key, value in losses.items() if "loss" in key)
    with pytest.raises(ConfigError, match="give label=1"):
        MODELS.build({**cfg.model, "terms": {"label": {"weight": 0.5}}})


def test_label_kd_on_a_cache_without_boxes_says_how_to_build_one(nus_one, pillar_ckpt, tmp_path):
    plain = tmp_path / "plain"
    build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(plain), layers="pts_neck", head_outputs="heatmap",
                             cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False))
    with pytest.raises(ConfigError, match=f"cache {plain} holds none; build it with .*--boxes"):
        _runner_config(plain, nus_one, kd={"label": 1.0})


def test_transfusion_heads_dense_heatmap_is_described_recorded_and_matched_by_class():
    # BEVFusion's TransFusionHead lives in mmdet3d's projects/BEVFusion, which pip's mmdet3d does not ship; this
    # head has the attributes featcache reads from it (a dense heatmap_head over all classes, then object
    # queries), as in that file: heatmap_head = ConvModule(hidden, hidden, 3) + Conv2d(hidden, num_classes, 3)
    from torch import nn

    from featcache.teacher.recording import LayerRecorder
    from lidar_fixtures import REPO
    from trainer.response_pairs import match_by_class

    class TransFusionHead(nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.num_classes, self.num_proposals = num_classes, 200
            self.shared_conv = nn.Conv2d(16, 8, 3, padding=1)
            self.heatmap_head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                              nn.Conv2d(8, num_classes, 3, padding=1))

        def forward(self, x):
            return self.heatmap_head(self.shared_conv(x))

    class BEVFusion(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bbox_head = TransFusionHead(10)

    classes = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
               "pedestrian", "traffic_cone")
    model = BEVFusion()
    (output,) = heads.head_outputs(model, ["heatmap"], classes)
    assert output.layer == "bbox_head.heatmap_head" and output.classes == classes and output.stored == "logits"
    assert output.meaning()["head_type"] == "TransFusionHead"
    with LayerRecorder(model, [output.layer]) as recorder:
        dense = model.bbox_head(torch.randn(1, 16, 12, 12))
    assert torch.equal(recorder.outputs[output.layer], dense) and dense.shape == (1, 10, 12, 12)
    with pytest.raises(ConfigError, match="per object query.*--head-outputs heatmap"):
        heads.head_outputs(model, ["heatmap", "reg"], classes)
    with pytest.raises(ConfigError, match="has 10 channels, one per class, and the teacher's dataset names 3"):
        heads.head_outputs(model, ["heatmap"], classes[:3])
    # an online teacher (featcache train --online-teacher) names its heatmap's classes from its config, as
    # featcache build does
    from mmengine.config import Config

    from trainer.response_pairs import online_head_outputs

    (online,) = online_head_outputs(model, Config(dict(class_names=list(classes))), ["heatmap"], "bevfusion.py")
    assert (online.layer, online.kind, online.classes) == (output.layer, "heatmap", classes)
    with pytest.raises(ConfigError, match="bevfusion.py names no class_names"):
        online_head_outputs(model, Config(dict(train_dataloader=dict(dataset=dict(type="NuScenesDataset")))),
                            ["heatmap"], "bevfusion.py")
    # a six-task CenterHead student reads its classes from the one ten-class heatmap
    models.init_mmdet3d_scope()
    student = models.build_model(models.load_config(str(REPO / "configs/students/centerpoint_pillar_half_nus.py")))
    pairs = match_by_class([(out.layer, out.classes) for out in heads.head_outputs(student, ["heatmap"])],
                           [(output.layer, output.classes)], "a BEVFusion cache")
    assert pairs["pts_bbox_head.task_heads.5.heatmap"] == ("bbox_head.heatmap_head", [8, 9])  # pedestrian, cone
    assert len(pairs) == 6


@pytest.mark.parametrize("codec", ["score8-zstd3", "asin8-zstd3"])
def test_score_codec_background_counts_as_non_zero_like_the_build_counts_logits(codec):
    # code 0 is a tiny score (score8: below 1/510, asin8: below 1e-5), a logit near -9, not a zero: inspect
    # must not call an empty scene's heatmap "(nearly) all zeros" where the build (which counts the
    # teacher's float logits) did not
    background = np.zeros((1, 8, 8), dtype=np.uint8)
    background[0, 3, 3] = 200  # one object
    fraction = nonzero_fraction(background, codecs.parse_codec(codec))
    assert fraction == 1.0 and not nearly_zero_layers({"heatmap": [fraction]})
    assert nonzero_fraction(np.zeros((1, 8, 8), np.float16), codecs.parse_codec("fp16-zstd1")) == 0.0


class _TransFusionLike(torch.nn.Module):
    """The attributes featcache reads from BEVFusion's TransFusionHead (see the test above)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes, self.num_proposals = num_classes, 200
        self.heatmap_head = torch.nn.Sequential(torch.nn.Conv2d(8, num_classes, 3, padding=1))


TRANSFUSION_CLASSES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
                       "pedestrian", "traffic_cone")


def test_reg_on_a_transfusion_teacher_says_what_works_instead():
    # --kd reg used to advise `--head-outputs all`, which the build refuses for a TransFusionHead
    from mmengine.config import Config
    from torch import nn

    from lidar_fixtures import REPO
    from trainer.terms import TERMS
    from trainer.response_pairs import TeacherOutput, config_head_type, online_head_outputs, response_pairs

    models.init_mmdet3d_scope()
    config = str(REPO / "configs/students/centerpoint_pillar_half_nus.py")
    student = models.build_model(models.load_config(config))
    reg_kinds = list(TERMS["reg"].kinds)
    advice = (r"head of cache C is a TransFusionHead \(BEVFusion\).*`featcache build --head-outputs all` refuses it.*"
              r"--kd heatmap .*--kd label .*--kd heatmap=10,label=1 on a cache built with --head-outputs heatmap --boxes")
    # a cache built with --head-outputs heatmap --boxes: its manifest names the head type of the heatmap
    heatmap = TeacherOutput("bbox_head.heatmap_head", "heatmap", TRANSFUSION_CLASSES, TRANSFUSION_CLASSES,
                            "TransFusionHead")
    with pytest.raises(ConfigError, match=advice):
        response_pairs(student, config, ["heatmap", *reg_kinds], [heatmap], "cache C")
    # a cache with boxes only: the teacher config it recorded names the head
    recorded = "model = dict(\n    bbox_head=dict(\n        type='TransFusionHead', num_proposals=200))"
    assert config_head_type(recorded) == "TransFusionHead" and config_head_type("model = dict(type='X')") == ""
    with pytest.raises(ConfigError, match=advice):
        response_pairs(student, config, reg_kinds, [], "cache C", teacher_head_type=config_head_type(recorded))
    # a CenterHead teacher's cache without regression outputs is still told how to build them
    with pytest.raises(ConfigError, match=r"build it with `featcache build \.\.\. --head-outputs all \(or reg"):
        response_pairs(student, config, reg_kinds, [], "cache C")
    # what the advice says works: the heatmap pairs with every student task
    heatmaps, regressions = response_pairs(student, config, ["heatmap"], [heatmap], "cache C")
    assert len(heatmaps) == 6 and not regressions
    # the same advice for an online teacher, and from the build's refusal
    model = nn.Module()
    model.bbox_head = _TransFusionLike()
    with pytest.raises(ConfigError, match=r"online teacher bevfusion\.py is a _TransFusionLike .*--kd label"):
        online_head_outputs(model, Config(dict(class_names=list(TRANSFUSION_CLASSES))), ["heatmap", *reg_kinds],
                            "bevfusion.py")
    with pytest.raises(ConfigError, match=r"per object query.*--head-outputs heatmap.*--kd heatmap=10,label=1"):
        heads.head_outputs(model, ["heatmap", "reg"], TRANSFUSION_CLASSES)


def test_head_outputs_a_transfusion_head_lacks_are_refused_before_model_and_dataset(tmp_path, monkeypatch):
    # the build used to find out only once the teacher model and its dataset were built (~9 s for BEVFusion)
    from featcache.teacher.options import resolve_config_path

    config = tmp_path / "bevfusion_like.py"
    config.write_text(f"_base_ = [{str(resolve_config_path(PILLAR_CONFIG))!r}]\n"
                      "model = dict(pts_bbox_head=dict(_delete_=True, type='TransFusionHead', num_proposals=200))\n")
    checkpoint = tmp_path / "teacher.pth"
    checkpoint.write_bytes(b"not read")

    def built(*args, **kwargs):
        raise AssertionError("built before --head-outputs was checked")

    monkeypatch.setattr(models, "build_model", built)
    monkeypatch.setattr(models, "build_dataset", built)
    for wanted, refused in (("all", "reg,height,dim,rot,vel"), ("heatmap,dim", "dim")):
        with pytest.raises(ConfigError, match=rf"--head-outputs {refused}: pts_bbox_head \(TransFusionHead\) regresses "
                                              r"boxes per object query.*--kd heatmap=10,label=1"):
            build_cache(BuildOptions(str(config), str(checkpoint), str(tmp_path / "out"), head_outputs=wanted,
                                     num_workers=0, progress=False))
    assert not (tmp_path / "out").exists()
    # a registered subclass of TransFusionHead counts too; a CenterHead config passes
    from mmdet3d.registry import MODELS

    class TransFusionHead(torch.nn.Module):
        pass

    @MODELS.register_module(name="MyTransFusionHeadForTest", force=True)
    class Mine(TransFusionHead):
        pass

    with pytest.raises(ConfigError, match=r"bbox_head \(MyTransFusionHeadForTest\)"):
        heads.check_config_head_outputs({"model": {"bbox_head": {"type": "MyTransFusionHeadForTest"}}}, ["reg"])
    heads.check_config_head_outputs({"model": {"bbox_head": {"type": "MyTransFusionHeadForTest"}}}, ["heatmap"])
    heads.check_config_head_outputs(models.load_config(PILLAR_CONFIG), heads.parse_head_outputs("all"))
