# CenterPoint-pillar student at a quarter of the teacher's widths and shallower backbone blocks.
_base_ = ['../_base_/synthetic_nus_pillar.py']

model = dict(
    pts_voxel_encoder=dict(feat_channels=[16]),
    pts_middle_encoder=dict(in_channels=16),
    pts_backbone=dict(in_channels=16, out_channels=[16, 32, 64], layer_nums=[2, 3, 3]),
    pts_neck=dict(in_channels=[16, 32, 64], out_channels=[32, 32, 32]),
    pts_bbox_head=dict(in_channels=96, share_conv_channel=16))
