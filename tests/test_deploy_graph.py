"""featcache.deploy.graph: the export's rewritten modules compute what the mmdet3d modules compute.

The demo configs' own exports are compared end to end with mmdet3d in test_deploy.py (dense outputs
< 1e-4, the same boxes). Here each rewrite is compared with its mmdet3d module directly, in torch, on the
pillars of the real nuScenes scan, including the variants the demo configs do not use (distance feature,
two PFN layers, average pooling, a legacy encoder, 1x1 final convolutions) and BatchNorm statistics far
from their initial values, so the folding is exercised.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import REPO
from lidar_fixtures import SHARED_DATA

from featcache.deploy.graph import CanvasScatter, PillarFeatures, graph_modules, transposed_final_conv, \
    with_transposed_final_convs
from featcache.deploy.spec import VoxelSpec
from featcache.deploy.voxelize import hard_voxelize

REAL_SCAN = next((SHARED_DATA / "nuscenes").glob("*.pcd.bin"), None)
VOXEL = VoxelSpec((0.32, 0.32, 8.0), (-32.0, -32.0, -5.0, 32.0, 32.0, 3.0), 20, 20000)


@pytest.fixture(scope="module")
def pillars():
    assert REAL_SCAN is not None, f"the real nuScenes scan is missing under {SHARED_DATA}"
    points = np.fromfile(REAL_SCAN, dtype=np.float32).reshape(-1, 5)[:, :4]
    voxels = hard_voxelize(points, VOXEL)
    assert len(voxels.num_points) > 1000 and (voxels.num_points < VOXEL.max_num_points).any() \
        and (voxels.num_points == VOXEL.max_num_points).any()  # pillars with and without padding rows
    return tuple(torch.from_numpy(array) for array in (voxels.voxels, voxels.num_points, voxels.coors))


def _encoder(**overrides):
    from mmdet3d.models.voxel_encoders import PillarFeatureNet

    settings = dict(in_channels=4, feat_channels=[32], with_distance=False, voxel_size=VOXEL.voxel_size,
                    point_cloud_range=VOXEL.point_cloud_range, norm_cfg=dict(type="BN1d", eps=1e-3, momentum=0.01),
                    legacy=False)
    settings.update(overrides)
    torch.manual_seed(0)
    encoder = PillarFeatureNet(**settings)
    for layer in encoder.pfn_layers:  # BN statistics of a trained model, not the identity
        norm = layer.norm
        norm.running_mean.uniform_(-2.0, 2.0)
        norm.running_var.uniform_(0.2, 5.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.5, 0.5)
    return encoder.eval()


@pytest.mark.parametrize("overrides, reordered", [
    ({}, True),                                   # the demo's encoder: the reordered GEMM + max
    ({"with_cluster_center": False}, True),
    ({"with_distance": True}, False),             # not linear in the point: decorated per point
    ({"feat_channels": [16, 32]}, False),         # two layers: the first is not pooled
    ({"mode": "avg"}, False),
])
def test_pillar_features_equal_pillar_feature_net(pillars, overrides, reordered):
    encoder = _encoder(**overrides)
    rewritten = PillarFeatures(encoder).eval()
    assert rewritten.reordered is reordered
    with torch.no_grad():
        expected = encoder(*pillars)
        ours = rewritten(*pillars)
    assert ours.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 1.0
    # float32 rounding of another summation order: relative to the features' scale
    assert float((ours - expected).abs().max()) < 2e-5 * scale, float((ours - expected).abs().max())


def test_a_legacy_encoder_keeps_its_module():
    """legacy=True overwrites its own input columns; graph_modules exports the module itself."""

    class Detector(torch.nn.Module):
        pass

    from mmdet3d.models.middle_encoders import PointPillarsScatter

    detector = Detector()
    detector.pts_voxel_encoder = _encoder(legacy=True)
    detector.pts_middle_encoder = PointPillarsScatter(in_channels=32, output_shape=[200, 200])
    detector.pts_bbox_head = torch.nn.Identity()  # no task_heads: the head keeps its module too
    assert set(graph_modules(detector)) == {"middle_encoder"}
    detector.pts_voxel_encoder = _encoder()
    assert set(graph_modules(detector)) == {"voxel_encoder", "middle_encoder"}


def test_canvas_scatter_equals_point_pillars_scatter(pillars):
    from mmdet3d.models.middle_encoders import PointPillarsScatter

    scatter = PointPillarsScatter(in_channels=32, output_shape=list(VOXEL.grid_size[1::-1]))
    features = torch.randn(len(pillars[1]), 32)
    expected = scatter(features, pillars[2], 1)
    ours = CanvasScatter(scatter)(features, pillars[2])
    assert torch.equal(ours, expected) and ours.shape == (1, 32, 200, 200)


@pytest.mark.parametrize("kernel, channels", [(3, 1), (3, 2), (3, 10), (1, 3), (5, 2)])
def test_transposed_final_conv_equals_the_conv(kernel, channels):
    torch.manual_seed(kernel * 10 + channels)
    conv = torch.nn.Conv2d(64, channels, kernel, padding=kernel // 2, bias=True)
    x = torch.randn(1, 64, 50, 50)
    with torch.no_grad():
        expected, ours = conv(x), transposed_final_conv(conv)(x)
    assert ours.shape == expected.shape
    assert float((ours - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def test_the_head_copy_changes_only_the_final_convolutions():
    """with_transposed_final_convs on the demo student's CenterHead: every SeparateHead branch ends in a
    ConvTranspose2d in the copy, the model's own head is untouched, and the dense maps agree."""
    from featcache.teacher import models

    torch.manual_seed(1)
    model = models.build_model(models.load_config(REPO / "configs" / "demo" / "student_slim.py")).eval()
    head = model.pts_bbox_head
    before = copy.deepcopy(head.state_dict())
    rewritten = with_transposed_final_convs(head)
    assert rewritten is not None
    finals = [getattr(task, name)[-1] for task in rewritten.task_heads for name in task.heads]
    assert len(finals) == 24 and all(type(final) is torch.nn.ConvTranspose2d for final in finals)
    assert all(type(getattr(task, name)[-1]) is torch.nn.Conv2d for task in head.task_heads for name in task.heads)
    assert all(torch.equal(value, head.state_dict()[key]) for key, value in before.items())
    x = [torch.randn(1, head.shared_conv.conv.in_channels, 50, 50)]
    with torch.no_grad():
        expected, ours = head(x), rewritten(x)
    for task_expected, task_ours in zip(expected, ours):
        for name, value in task_expected[0].items():
            assert float((task_ours[0][name] - value).abs().max()) < 1e-4, name
