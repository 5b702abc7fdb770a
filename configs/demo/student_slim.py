# Demo student: half widths and a shallower backbone (1/2/2 instead of 3/5/5 convolutions per stage)
# with a narrower shared head convolution: the smallest and fastest model of the demo.
_base_ = ['./student_half.py']

model = dict(
    pts_backbone=dict(layer_nums=[1, 2, 2]),
    pts_bbox_head=dict(share_conv_channel=16))
