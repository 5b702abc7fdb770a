# Demo student: the teacher's layout at half its channel widths (about a quarter of its parameters).
_base_ = ['../_base_/demo_scenes.py']

model = dict(
    pts_voxel_encoder=dict(feat_channels=[16]),
    pts_middle_encoder=dict(in_channels=16),
    pts_backbone=dict(in_channels=16, out_channels=[16, 32, 64]),
    pts_neck=dict(in_channels=[16, 32, 64], out_channels=[32, 32, 32]),
    pts_bbox_head=dict(in_channels=96, share_conv_channel=32))
