# Demo student that cannot inherit: its own pillar grid (0.4 m pillars, 160x160 BEV cells, 40x40 heads at
# 1.6 m, against the teacher's 0.32 m / 200x200 / 50x50) and its own widths and depths. The teacher's weights
# were learned on another discretisation (`featcache train --init-from-teacher` refuses it), so only the
# cache can carry the teacher to it: every cached map is resampled onto its grid (BevAlignment.warp).
# This is the edge-student case of "one cache, many students": a model sized for its target, not sliced
# from the teacher.
_base_ = ['../_base_/demo_scenes.py']

voxel_size = [0.4, 0.4, 8.0]
grid_size = [160, 160, 1]

model = dict(
    data_preprocessor=dict(voxel_layer=dict(voxel_size=voxel_size)),
    pts_voxel_encoder=dict(feat_channels=[24], voxel_size=voxel_size),
    pts_middle_encoder=dict(in_channels=24, output_shape=grid_size[:2]),
    pts_backbone=dict(in_channels=24, out_channels=[24, 48, 96], layer_nums=[1, 2, 2]),
    pts_neck=dict(in_channels=[24, 48, 96], out_channels=[32, 32, 32]),
    pts_bbox_head=dict(in_channels=96, share_conv_channel=32, bbox_coder=dict(voxel_size=voxel_size[:2])),
    train_cfg=dict(pts=dict(grid_size=grid_size, voxel_size=voxel_size)),
    test_cfg=dict(pts=dict(voxel_size=voxel_size[:2])))

# The rate anneals per iteration to its floor (1e-3 of the peak), so the last steps settle the weights and
# the schedule's shape does not depend on how many epochs a comparison trains: both arms of a comparison
# train the same iterations under the same curve.
lr = 2e-3
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', T_max={{_base_.max_epochs}}, eta_min=lr * 1e-3, begin=0, end={{_base_.max_epochs}},
         by_epoch=True, convert_to_iter_based=True),
]
