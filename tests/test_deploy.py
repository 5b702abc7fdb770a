"""`featcache deploy` / `featcache predict`: the ONNX export of CenterPoint-pillar detectors and the
numpy + onnxruntime runtime, checked against mmcv and mmdet3d on real and generated scans.

- the numpy voxelisation equals mmcv's ``Voxelization`` bit for bit (max_voxels / max_num_points caps too);
- the graph's dense head outputs match PyTorch's within 1e-4 (max abs) and the decoded, NMS-ed boxes
  match mmdet3d's ``predict`` for the demo student (configs/demo/student_half.py, seeded weights: the same
  boxes and labels) and for the shipped trained demo teacher (configs/demo/teacher_pillar.py, rotated NMS,
  real detections: the same boxes, labels and order), on generated scans and the real nuScenes scan;
- ``featcache predict`` runs in a process where torch, mmcv, mmdet3d and mmengine cannot be imported;
- bad input fails naming the file: wrong point features, empty scan, missing / incomplete / stale
  export directory, a checkpoint that does not fit the config, a detector the export cannot carry.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import REPO

from featcache.cli import main
from featcache.deploy.errors import ExportNotFoundError, PointsError, StaleExportError, UnsupportedModelError
from featcache.deploy.runtime import DeployedDetector
from featcache.deploy.spec import SPEC_FILE, VoxelSpec
from featcache.deploy.voxelize import hard_voxelize
from featcache.errors import CheckpointError, ConfigError
from featcache.testing import NUS_INFO, SHARED_DATA, save_openmmlab_checkpoint

STUDENT = "configs/demo/student_half.py"
TEACHER = "configs/demo/teacher_pillar.py"
TEACHER_CKPT = REPO / "checkpoints" / "demo_teacher_pillar.pth"
REAL_SCAN = next((SHARED_DATA / "nuscenes").glob("*.pcd.bin"), None)
FEATCACHE = str(REPO / ".venv" / "bin" / "featcache") if (REPO / ".venv" / "bin" / "featcache").exists() else "featcache"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A generated dataset (the demo's generator, seeded): 2 train scans (int8 calibration), 3 val."""
    root = tmp_path_factory.mktemp("scenes")
    subprocess.run([sys.executable, str(REPO / "tools" / "generate_scenes.py"), "--out", str(root), "--train", "2",
                    "--val", "3", "--seed", "11", "--range", "40"], check=True, capture_output=True, cwd=REPO)
    return root


@pytest.fixture(scope="module")
def scans(scenes) -> list[str]:
    """The three generated val scans and the real nuScenes LIDAR_TOP scan."""
    assert REAL_SCAN is not None and NUS_INFO.is_file(), f"the real nuScenes scan is missing under {SHARED_DATA}"
    root = scenes
    generated = sorted(str(path) for path in (root / "samples" / "LIDAR_TOP").glob("synth_val_*.bin"))
    assert len(generated) == 3
    return generated + [str(REAL_SCAN)]


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory):
    """The demo student with seeded weights (tools/init_checkpoint.py's way): no trained student ships
    with the repository (`make demo` trains them); the trained teacher below covers trained weights."""
    from featcache.teacher import models

    torch.manual_seed(3)
    model = models.build_model(models.load_config(REPO / STUDENT))
    return save_openmmlab_checkpoint(model, tmp_path_factory.mktemp("student_ckpt") / "student_half_seed3.pth")


@pytest.fixture(scope="module")
def student_export(tmp_path_factory, student_ckpt) -> str:
    """The demo student exported through the CLI, as a user runs it."""
    out = str(tmp_path_factory.mktemp("exports") / "student_half")
    result = CliRunner().invoke(main, ["deploy", str(REPO / STUDENT), str(student_ckpt), "--out", out])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "opset 18" in result.output
    return out


@pytest.fixture(scope="module")
def teacher_export(tmp_path_factory, scenes) -> str:
    """The shipped trained teacher, with an int8 copy calibrated on the generated train scans."""
    from featcache.deploy.export import export_detector

    assert TEACHER_CKPT.is_file(), f"the shipped demo teacher {TEACHER_CKPT} is missing"
    out = str(tmp_path_factory.mktemp("exports") / "teacher")
    export_detector(str(REPO / TEACHER), str(TEACHER_CKPT), out, quantize="int8", calibration_scans=2,
                    cfg_options={"train_dataloader.dataset.data_root": f"{scenes}/"})
    return out


def _mmdet3d_reference(cfg, model, scan: str):
    """mmdet3d's own path: the config's test pipeline on the file, the data preprocessor, predict."""
    from mmdet3d.structures import LiDARInstance3DBoxes
    from mmengine.dataset import Compose, pseudo_collate

    data = Compose(cfg.test_dataloader.dataset.pipeline)(
        dict(lidar_points=dict(lidar_path=scan), box_type_3d=LiDARInstance3DBoxes, box_mode_3d=None))
    with torch.no_grad():
        inputs = model.data_preprocessor(pseudo_collate([data]), False)
        pred = model(**inputs, mode="predict")[0].pred_instances_3d
    return inputs["inputs"]["voxels"], pred


def _canonical(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray):
    order = np.lexsort((boxes[:, 1], boxes[:, 0], labels))
    return boxes[order], scores[order], labels[order]


def _assert_equivalent(export_dir: str, config: str, checkpoint, scans: list[str], min_boxes: int,
                       ordered: bool = True) -> None:
    """``ordered``: the same detections in the same order; else the same set (an untrained model's
    scores tie exactly, and torch's sort orders ties its own way)."""
    from featcache.deploy.export import load_detector, network_outputs

    cfg, model = load_detector(REPO / config, checkpoint)
    detector = DeployedDetector.open(export_dir)
    for scan in scans:
        voxels = detector.voxelize(scan)
        reference_voxels, pred = _mmdet3d_reference(cfg, model, scan)
        # pre-processing: the very pillars mmdet3d's data preprocessor made
        assert np.array_equal(voxels.voxels, reference_voxels["voxels"].numpy()), scan
        assert np.array_equal(voxels.num_points, reference_voxels["num_points"].numpy()), scan
        assert np.array_equal(voxels.coors, reference_voxels["coors"].numpy()), scan
        # the graph: every dense head output within 1e-4 of PyTorch
        ours, theirs = detector.raw_outputs(voxels), network_outputs(model, voxels.voxels, voxels.num_points,
                                                                     voxels.coors)
        assert set(ours) == set(theirs) == set(detector.spec.output_names)
        worst = max(float(np.abs(ours[name] - theirs[name]).max()) for name in theirs)
        assert worst < 1e-4, f"{scan}: ONNX Runtime vs PyTorch max abs {worst}"
        # post-processing: the same detections, in the same order
        detections = detector.postprocess(ours)
        mine = (detections.boxes, detections.scores, detections.labels)
        reference = (pred.bboxes_3d.tensor.numpy(), pred.scores_3d.numpy(), pred.labels_3d.numpy().astype(np.int64))
        assert len(mine[0]) == len(reference[0]) >= min_boxes, (scan, len(mine[0]), len(reference[0]))
        if not ordered:
            mine, reference = _canonical(*mine), _canonical(*reference)
        np.testing.assert_array_equal(mine[2], reference[2])
        np.testing.assert_allclose(mine[1], reference[1], atol=1e-5)
        np.testing.assert_allclose(mine[0], reference[0], atol=2e-3)


def test_numpy_voxelisation_equals_mmcv_including_the_caps(scans):
    from mmcv.ops import Voxelization

    rng = np.random.default_rng(0)
    for scan in scans:
        points = np.fromfile(scan, dtype=np.float32).reshape(-1, 5)[:, :4]
        points = points[rng.permutation(len(points))]
        # the demo's settings, both caps biting, then a grid of more than 2**16 cells (the sort takes int32 keys)
        for size, max_points, max_voxels in (((0.32, 0.32, 8.0), 20, 20000), ((0.32, 0.32, 8.0), 3, 500),
                                             ((0.1, 0.1, 0.2), 5, 30000)):
            spec = VoxelSpec(size, (-32.0, -32.0, -5.0, 32.0, 32.0, 3.0), max_points, max_voxels)
            ours = hard_voxelize(points, spec)
            layer = Voxelization(list(spec.voxel_size), list(spec.point_cloud_range), max_points, max_voxels).eval()
            voxels, coors, counts = layer(torch.from_numpy(points))
            assert np.array_equal(ours.voxels, voxels.numpy()) and np.array_equal(ours.num_points, counts.numpy())
            assert np.array_equal(ours.coors[:, 1:], coors.numpy()) and not ours.coors[:, 0].any()
            if size[0] == 0.1:
                assert np.prod(spec.grid_size) > 1 << 16 and len(ours.num_points) > 500
            elif max_voxels == 500:
                assert len(ours.num_points) == 500 and ours.num_points.max() == 3


def test_student_export_matches_pytorch_and_mmdet3d(student_export, student_ckpt, scans):
    spec = DeployedDetector.open(student_export).spec
    assert spec.onnx.opset == 18 and spec.check["max_abs_diff_fp32"] < 1e-4
    assert spec.class_names == ("car", "truck", "bicycle", "pedestrian", "barrier", "traffic_cone")
    assert (spec.voxel.max_num_points, spec.voxel.max_voxels, spec.points.load_dim, spec.points.use_dim) == \
        (20, 20000, 5, (0, 1, 2, 3))
    from featcache.deploy.runtime import sha256_of

    assert spec.source["checkpoint_sha256"] == sha256_of(student_ckpt)
    _assert_equivalent(student_export, STUDENT, student_ckpt, scans, min_boxes=20, ordered=False)


def test_trained_teacher_export_detects_what_mmdet3d_detects(teacher_export, scans):
    _assert_equivalent(teacher_export, TEACHER, TEACHER_CKPT, scans, min_boxes=1)


def test_int8_model_is_calibrated_on_training_scans_and_close_to_fp32(teacher_export, scans):
    fp32 = DeployedDetector.open(teacher_export)
    int8 = DeployedDetector.open(teacher_export, variant="int8")
    info = fp32.spec.onnx.int8
    assert info["calibration_scans"] == [f"synth_train_00000{i}__LIDAR_TOP.pcd.bin" for i in (0, 1)]
    size = {name: os.path.getsize(os.path.join(teacher_export, name)) for name in ("model.onnx", info["file"])}
    assert size[info["file"]] < 0.4 * size["model.onnx"]
    voxels = fp32.voxelize(scans[0])
    ours, reference = int8.raw_outputs(voxels), fp32.raw_outputs(voxels)
    for name in ("task0.heatmap", "task0.reg"):  # quantised, so not equal, but the same maps
        assert not np.array_equal(ours[name], reference[name])
        assert np.corrcoef(ours[name].ravel(), reference[name].ravel())[0, 1] > 0.95, name
    assert len(int8.postprocess(ours)) > 0


def test_the_graph_runs_the_rewritten_modules_and_int8_keeps_pillars_and_outputs_float(teacher_export):
    """The exported graph is featcache.deploy.graph's (no whole-tensor ScatterElements, no NonZero, each head
    output made by a ConvTranspose), and the int8 copy quantises the convolutions but neither the pillar stage
    nor the layers that make the outputs."""
    import onnx

    from featcache.deploy.quantize import float_nodes, pillar_stage_nodes

    fp32 = onnx.load(os.path.join(teacher_export, "model.onnx"))
    ops = [node.op_type for node in fp32.graph.node]
    assert "ScatterElements" not in ops and "NonZero" not in ops and ops.count("ScatterND") == 1
    producer = {output: node for node in fp32.graph.node for output in node.output}
    spec = DeployedDetector.open(teacher_export).spec
    assert {producer[name].op_type for name in spec.output_names} == {"ConvTranspose"}
    pillar = pillar_stage_nodes(fp32)
    assert "ScatterND" in {node.op_type for node in fp32.graph.node if node.name in pillar}
    assert not {node.op_type for node in fp32.graph.node if node.name in pillar} & {"Conv", "ConvTranspose"}
    int8 = onnx.load(os.path.join(teacher_export, spec.onnx.int8["file"]))
    int8_producer = {output: node for node in int8.graph.node for output in node.output}
    kept_float = set(float_nodes(fp32))
    assert kept_float == set(pillar) | {producer[name].name for name in spec.output_names}
    outputs = {producer[name].name for name in spec.output_names}
    for node in int8.graph.node:
        # float: no input of the pillar stage, and no weight of an output layer, comes through a DequantizeLinear
        # (an output layer's activation input does: the convolution before it is quantised)
        if node.name in kept_float:
            checked = node.input[1:] if node.name in outputs else node.input
            assert all(getattr(int8_producer.get(name), "op_type", None) != "DequantizeLinear" for name in checked), \
                node.name
    convs = [node for node in int8.graph.node if node.op_type == "Conv"]
    assert convs and all(int8_producer[node.input[1]].op_type == "DequantizeLinear" for node in convs)


BLOCKER = '''
import importlib.abc, sys
BLOCKED = ("torch", "mmcv", "mmdet", "mmdet3d", "mmengine", "spconv")
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this process (featcache predict must not need it)")
        return None
sys.meta_path.insert(0, _Block())
'''


def test_predict_command_needs_neither_torch_nor_mmdet3d(student_export, teacher_export, scans, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    for module in ("torch", "mmdet3d"):  # the blocker really blocks
        probe = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and "blocked" in probe.stderr
    out = tmp_path / "pred.json"
    result = subprocess.run([FEATCACHE, "predict", student_export, scans[-1], "--out", str(out)], env=env,
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    written = json.loads(out.read_text())
    expected = DeployedDetector.open(student_export).predict(scans[-1])
    assert len(written["scores_3d"]) == len(expected) > 0
    np.testing.assert_allclose(np.asarray(written["bboxes_3d"]), expected.boxes, atol=1e-5)
    assert written["labels_3d"] == expected.labels.tolist()
    printed = subprocess.run([FEATCACHE, "predict", student_export, scans[0]], env=env, capture_output=True,
                             text=True, timeout=120)
    assert printed.returncode == 0 and json.loads(printed.stdout)["box_layout"][:3] == ["x", "y", "z"]
    quantised = subprocess.run([FEATCACHE, "predict", teacher_export, scans[0], "--int8", "--threads", "1"], env=env,
                               capture_output=True, text=True, timeout=120)
    assert quantised.returncode == 0, quantised.stderr
    assert len(json.loads(quantised.stdout)["scores_3d"]) == len(
        DeployedDetector.open(teacher_export, variant="int8").predict(scans[0]))


def test_bad_scans_fail_naming_the_file(student_export, tmp_path, scans):
    detector = DeployedDetector.open(student_export)
    points = np.fromfile(scans[0], dtype=np.float32).reshape(-1, 5)
    with pytest.raises(PointsError, match="3 features, the exported model takes 4 or 5"):
        detector.predict(points[:, :3])
    assert len(detector.predict(points)) == len(detector.predict(points[:, :4]))  # file layout or used features
    truncated = tmp_path / "truncated.bin"
    points.reshape(-1)[:-2].tofile(truncated)  # not a whole number of 5-feature points
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    far = tmp_path / "far.bin"
    (points + np.float32([500, 0, 0, 0, 0])).tofile(far)
    for path, message in ((truncated, "not a whole number of points of 5 features"), (empty, "holds no points"),
                          (far, "none of its .* points lies inside"), (tmp_path / "missing.bin", "does not exist")):
        with pytest.raises(PointsError, match=message) as info:
            detector.predict(str(path))
        assert str(path) in str(info.value)
        result = CliRunner().invoke(main, ["predict", student_export, str(path)])
        assert result.exit_code != 0 and path.name in result.output


def test_missing_incomplete_and_stale_exports_are_refused(student_export, student_ckpt, teacher_export, tmp_path):
    with pytest.raises(ExportNotFoundError, match="does not exist"):
        DeployedDetector.open(tmp_path / "nowhere")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(student_export, incomplete)
    (incomplete / SPEC_FILE).unlink()
    with pytest.raises(ExportNotFoundError, match="not a finished featcache export"):
        DeployedDetector.open(incomplete)
    mixed = tmp_path / "mixed"
    shutil.copytree(student_export, mixed)
    shutil.copy(os.path.join(teacher_export, "model.onnx"), mixed / "model.onnx")  # another export's graph
    with pytest.raises(StaleExportError, match="not the model .* was written for") as info:
        DeployedDetector.open(mixed)
    assert str(mixed / "model.onnx") in str(info.value)
    old = tmp_path / "old"
    shutil.copytree(student_export, old)
    spec = json.loads((old / SPEC_FILE).read_text())
    (old / SPEC_FILE).write_text(json.dumps({**spec, "format_version": 0}))
    with pytest.raises(StaleExportError, match="format_version 0"):
        DeployedDetector.open(old)
    DeployedDetector.open(student_export).check_source(student_ckpt)
    with pytest.raises(StaleExportError, match="was made from checkpoint") as info:  # another checkpoint
        DeployedDetector.open(student_export).check_source(TEACHER_CKPT)
    assert str(TEACHER_CKPT) in str(info.value)
    result = CliRunner().invoke(main, ["predict", str(mixed), "x.bin"])
    assert result.exit_code == 1 and "StaleExportError" in result.output and "mixed" in result.output


def test_deploy_refuses_what_it_must_not_write_or_cannot_export(student_export, student_ckpt, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(main, ["deploy", str(REPO / STUDENT), str(student_ckpt), "--out", str(foreign),
                                           *extra])
        assert result.exit_code == 1 and str(foreign) in result.output, result.output
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(os.listdir(foreign)) == ["notes.txt"]
    result = CliRunner().invoke(main, ["deploy", str(REPO / STUDENT), str(student_ckpt), "--out", student_export])
    assert result.exit_code == 1 and "--overwrite" in result.output
    # the trained teacher's weights do not fit the half-width student
    from featcache.deploy.export import export_detector

    with pytest.raises(CheckpointError, match=r"does not fit the model: \d+ tensors have other shapes") as info:
        export_detector(str(REPO / STUDENT), str(TEACHER_CKPT), str(tmp_path / "wrong"))
    assert str(TEACHER_CKPT) in str(info.value) and "student_half.py" in str(info.value)
    assert not (tmp_path / "wrong").exists()
    # int8 calibration needs the train scans: a wrong data root fails after model.onnx was written, and the
    # half export goes with the directory this export created
    nowhere = tmp_path / "no_data"
    with pytest.raises(ConfigError, match="nuscenes_infos_train.pkl"):
        export_detector(str(REPO / STUDENT), str(student_ckpt), str(tmp_path / "failed"), quantize="int8",
                        cfg_options={"train_dataloader.dataset.data_root": f"{nowhere}/"})
    assert not (tmp_path / "failed").exists()


@pytest.mark.parametrize("config", ["configs/students/centerpoint_pillar_half_nus.py",
                                    "configs/students/centerpoint_pillar_quarter_nus.py"])
def test_the_nuscenes_pillar_students_are_exportable(config):
    """The project's nuScenes students pass the export's checks; their settings come from the built modules
    (no test pipeline in these configs: the runtime takes the 5 features the voxel encoder reads)."""
    from featcache.teacher import models
    from featcache.deploy.export import check_exportable, describe

    cfg = models.load_config(REPO / config)
    model = models.build_model(cfg)
    check_exportable(model)
    points, voxel, decoder, nms = describe(model, cfg)
    assert (points.load_dim, points.use_dim) == (5, (0, 1, 2, 3, 4))
    assert voxel.grid_size == (512, 512, 1) and voxel.max_voxels == 40000 and nms.type == "rotate"
    assert decoder.out_size_factor == 4 and decoder.code_size == 9


@pytest.mark.parametrize("config, module", [
    ("configs/students/pointpillars_kitti_car_student.py", r"bbox_head \(Anchor3DHead\)"),
    ("centerpoint/centerpoint_voxel0075_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d.py",
     r"pts_voxel_encoder \(HardSimpleVFE\)"),
])
def test_a_detector_it_cannot_export_fails_naming_the_module(config, module):
    from featcache.teacher import models
    from featcache.deploy.export import check_exportable

    path = REPO / config if config.startswith("configs/") else config
    with pytest.raises(UnsupportedModelError, match=module):
        check_exportable(models.build_model(models.load_config(path)))
