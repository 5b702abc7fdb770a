"""The mmdet3d integration layer on real models and the real nuScenes scan."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from featcache.teacher import models, recording
from featcache.teacher.checkpoint import load_checkpoint_file, load_weights
from featcache.teacher.options import resolve_config_path
from featcache.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from lidar_fixtures import PILLAR_CONFIG, VOXEL_CONFIG, nus_cfg_options, save_openmmlab_checkpoint


def _training_batch(cfg, data_root):
    """The real scan with its 69 boxes through the config's train pipeline, minus GT paste
    (ObjectSample needs a GT database this test does not have)."""
    dataset_cfg = models.dataset_cfg_for_split(cfg, "train", pipeline="own")
    dataset_cfg["pipeline"] = [step for step in dataset_cfg["pipeline"] if step["type"] != "ObjectSample"]
    dataset = models.build_dataset(dataset_cfg)
    from mmengine.dataset import pseudo_collate

    return pseudo_collate([dataset[0]])


def test_packaged_config_resolves_by_package_path():
    path = resolve_config_path(f"mmdet3d::{PILLAR_CONFIG}")
    assert path.is_file() and path == resolve_config_path(PILLAR_CONFIG)
    with pytest.raises(ConfigError, match="no_such_config.py"):
        resolve_config_path("centerpoint/no_such_config.py")


def test_config_with_custom_imports_builds(tmp_path, monkeypatch):
    (tmp_path / "featcache_test_plugin.py").write_text(textwrap.dedent("""
        from mmdet3d.models.middle_encoders import PointPillarsScatter
        from mmdet3d.registry import MODELS

        @MODELS.register_module(force=True)
        class TaggedScatter(PointPillarsScatter):
            tag = "loaded through custom_imports"
    """))
    base = resolve_config_path(PILLAR_CONFIG)
    config = tmp_path / "plugin_config.py"
    config.write_text(f"_base_ = [{str(base)!r}]\n"
                      "custom_imports = dict(imports=['featcache_test_plugin'], allow_failed_imports=False)\n"
                      "model = dict(pts_middle_encoder=dict(type='TaggedScatter'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = models.build_model(models.load_config(config))
    assert type(model.pts_middle_encoder).__name__ == "TaggedScatter"
    assert model.pts_middle_encoder.tag == "loaded through custom_imports"


def test_config_that_does_not_build_names_itself(tmp_path):
    base = resolve_config_path(PILLAR_CONFIG)
    config = tmp_path / "broken.py"
    config.write_text(f"_base_ = [{str(base)!r}]\nmodel = dict(pts_backbone=dict(type='NoSuchBackbone'))\n")
    with pytest.raises(ConfigError, match="broken.py.*does not build.*NoSuchBackbone"):
        models.build_model(models.load_config(config))


def test_centerpoint_pillar_trains_on_real_scan(nus_one):
    torch.manual_seed(0)
    cfg = models.load_config(PILLAR_CONFIG, nus_cfg_options(nus_one))
    model = models.build_model(cfg).train()
    batch = _training_batch(cfg, nus_one)
    assert len(batch["data_samples"][0].gt_instances_3d) > 20  # the scan's boxes reached the model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    totals = []
    for _ in range(5):
        data = model.data_preprocessor(copy.deepcopy(batch), True)
        losses = model(**data, mode="loss")
        total, log_vars = model.parse_losses(losses)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(float(total.detach()))
    assert all(torch.isfinite(torch.tensor(totals)))
    assert totals[-1] < totals[0], totals


def test_centerpoint_voxel0075_has_bevfusion_lidar_shapes(nus_one):
    cfg = models.load_config(VOXEL_CONFIG, nus_cfg_options(nus_one))
    model = models.build_model(cfg).eval()
    dataset = models.build_dataset(models.dataset_cfg_for_split(cfg, "val"))
    from mmengine.dataset import pseudo_collate

    outputs = recording.record_teacher(model, pseudo_collate([dataset[0]]),
                                       ["pts_middle_encoder", "pts_backbone", "pts_neck"])
    shapes = {name: tuple(value.shape) for name, value in outputs.items()}
    assert shapes == {
        "pts_middle_encoder": (1, 256, 180, 180),
        "pts_backbone.0": (1, 128, 180, 180),
        "pts_backbone.1": (1, 256, 90, 90),
        "pts_neck.0": (1, 512, 180, 180),
    }
    assert outputs["pts_middle_encoder"].abs().sum() > 0  # the scan's points produced features


def test_init_weights_applies_the_heatmap_prior_mmengine_misses():
    """mmdet3d 1.4's CenterHead keeps its SeparateHeads in a plain nn.ModuleList, which mmengine's
    recursive init_weights does not enter: the heatmap bias keeps PyTorch's default init."""
    torch.manual_seed(0)
    plain = models.build_model(models.load_config(PILLAR_CONFIG))
    plain.init_weights()
    heads = plain.pts_bbox_head.task_heads
    assert not any(torch.allclose(head.heatmap[-1].bias, torch.tensor(-2.19)) for head in heads)
    torch.manual_seed(0)
    fixed = models.build_model(models.load_config(PILLAR_CONFIG))
    models.init_weights(fixed)
    for plain_head, head in zip(heads, fixed.pts_bbox_head.task_heads):
        assert torch.allclose(head.heatmap[-1].bias, torch.tensor(-2.19))
        # only the prior: every weight is what mmengine's init gave
        assert torch.equal(head.heatmap[-1].weight, plain_head.heatmap[-1].weight)


def test_recorder_names_a_missing_module():
    cfg = models.load_config(PILLAR_CONFIG)
    model = models.build_model(cfg)
    with pytest.raises(ConfigError, match="pts_nothing.*top-level modules: .*pts_backbone"):
        recording.LayerRecorder(model, ["pts_nothing"])


def test_checkpoint_round_trip_through_safe_loader(tmp_path):
    cfg = models.load_config(PILLAR_CONFIG)
    torch.manual_seed(1)
    source = models.build_model(cfg)
    path = save_openmmlab_checkpoint(source, tmp_path / "pillar.pth")
    # plain torch.load (weights_only default) refuses the numpy/mmengine content ...
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path)
    # ... featcache's allow-list reads it, and the weights arrive intact
    torch.manual_seed(2)
    target = models.build_model(cfg)
    meta = load_weights(target, path)
    assert int(meta["iter"]) == 10
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name
    assert "message_hub" in load_checkpoint_file(path)


def test_safe_loads_leave_the_process_wide_allow_list_in_place(tmp_path):
    # featcache train registers the allow-list for the process (mmengine's resume calls torch.load
    # itself); a featcache load in between (the checkpoint-fit check) must not take it away again
    from featcache.teacher.checkpoint import allow_openmmlab_globals_for_process

    path = save_openmmlab_checkpoint(models.build_model(models.load_config(PILLAR_CONFIG)), tmp_path / "p.pth")
    before = list(torch.serialization.get_safe_globals())
    try:
        allow_openmmlab_globals_for_process()
        load_checkpoint_file(path)
        assert "message_hub" in torch.load(path, weights_only=True)  # what mmengine's resume does
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "meta": _Payload(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil.pth.*(posix|os)\.system"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_getattr_is_restricted_to_history_buffer_methods(tmp_path):
    from mmengine.logging.history_buffer import HistoryBuffer

    class _Walk:  # a first step towards HistoryBuffer.__init__.__globals__ (and from there, anything)
        def __reduce__(self):
            return (getattr, (HistoryBuffer, "__init__"))

    path = tmp_path / "walk.pth"
    torch.save({"meta": _Walk()}, path)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(path)
    with pytest.raises(Exception):  # torch itself refuses getattr without the allow-list
        torch.load(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 10])
def test_non_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_checkpoint_file(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    cfg = models.load_config(PILLAR_CONFIG)
    path = save_openmmlab_checkpoint(models.build_model(cfg), tmp_path / "full.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_checkpoint_file(truncated)


def test_cli_help_lists_commands_and_rejects_unknown_options():
    featcache = [sys.executable, "-m", "featcache.cli"]
    result = subprocess.run(featcache + ["--help"], capture_output=True, text=True, check=True)
    for command in ("build", "verify", "inspect", "export"):
        assert f"  {command} " in result.stdout
    bad = subprocess.run(featcache + ["build", "--no-such-option"], capture_output=True, text=True)
    assert bad.returncode == 2 and "No such option '--no-such-option'" in bad.stderr and "Usage:" in bad.stderr


def test_custom_import_failure_keeps_its_cause_and_says_what_to_do(tmp_path, monkeypatch):
    # a BEVFusion-like project whose compiled op is missing: the module is found, and fails inside
    package = tmp_path / "fakeprojects" / "BEVFusion" / "bevfusion"
    (package / "ops").mkdir(parents=True)
    for directory in (package.parent.parent, package.parent, package):
        (directory / "__init__.py").touch()
    (package / "__init__.py").write_text("from .ops import bev_pool\n")
    (package / "ops" / "__init__.py").touch()
    (package / "ops" / "bev_pool.py").write_text("from . import bev_pool_ext  # the op setup.py compiles\n")
    base = resolve_config_path(PILLAR_CONFIG)
    for name, module, expected in (
            ("ops", "fakeprojects.BEVFusion.bevfusion", r"bev_pool_ext.*projects/BEVFusion/setup.py develop"),
            ("path", "featcache_no_such_project.plugin", r"No module named 'featcache_no_such_project'.*PYTHONPATH")):
        config = tmp_path / f"{name}.py"
        config.write_text(f"_base_ = [{str(base)!r}]\n"
                          f"custom_imports = dict(imports=[{module!r}], allow_failed_imports=False)\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        with pytest.raises(ConfigError, match=rf"{name}.py.*{module}.*does not import.*{expected}") as info:
            models.load_config(config)
        assert isinstance(info.value.__cause__, ImportError)


def test_override_on_a_wrapped_dataset_names_the_path_that_reaches_it():
    # mmdet3d's CenterPoint nuScenes config wraps its train set in a CBGSDataset
    with pytest.raises(ConfigError, match=r"train_dataloader.dataset is a CBGSDataset.*no 'data_root'.*"
                                          r"train_dataloader.dataset.dataset.data_root="):
        models.load_config(PILLAR_CONFIG, {"train_dataloader.dataset.data_root": "/data/nuscenes/"})
    cfg = models.load_config(PILLAR_CONFIG, {"train_dataloader.dataset.dataset.data_root": "/data/nuscenes/",
                                             "train_dataloader.dataset.type": "CBGSDataset"})
    assert cfg.train_dataloader.dataset.dataset.data_root == "/data/nuscenes/"


KITTI_CONFIG = "pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car.py"


def test_default_layers_follow_the_detector_and_a_missing_layer_lists_both_conventions():
    centerpoint = models.build_model(models.load_config(PILLAR_CONFIG))
    pointpillars = models.build_model(models.load_config(KITTI_CONFIG))  # a single-stage VoxelNet
    assert models.default_layers(centerpoint) == ["pts_middle_encoder", "pts_backbone", "pts_neck"]
    assert models.default_layers(pointpillars) == ["middle_encoder", "backbone", "neck"]
    with pytest.raises(ConfigError, match=r"'pts_neck' not found in VoxelNet.*pts_middle_encoder,pts_backbone,"
                                          r"pts_neck.*middle_encoder,backbone,neck"):
        recording.find_modules(pointpillars, ["pts_neck"])


def test_a_checkpoint_of_other_widths_is_refused_naming_file_and_tensors(tmp_path):
    from lidar_fixtures import REPO

    half = models.build_model(models.load_config(str(REPO / "configs/students/centerpoint_pillar_half_nus.py")))
    path = save_openmmlab_checkpoint(half, tmp_path / "half.pth")
    full = models.build_model(models.load_config(PILLAR_CONFIG))
    before = {name: value.clone() for name, value in full.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"half.pth' does not fit the model: \d+ tensors have other shapes "
                                              r"\(pts_.*: checkpoint \(\d+.*, model \(\d+.*another config"):
        load_weights(full, path)
    assert all(torch.equal(before[name], value) for name, value in full.state_dict().items())  # nothing loaded
