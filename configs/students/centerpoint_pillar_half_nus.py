# CenterPoint-pillar student at half the teacher's widths (~25% of its parameters).
_base_ = ['../_base_/synthetic_nus_pillar.py']

model = dict(
    pts_voxel_encoder=dict(feat_channels=[32]),
    pts_middle_encoder=dict(in_channels=32),
    pts_backbone=dict(in_channels=32, out_channels=[32, 64, 128]),
    pts_neck=dict(in_channels=[32, 64, 128], out_channels=[64, 64, 64]),
    pts_bbox_head=dict(in_channels=192, share_conv_channel=32))
