# The embedded default benchmark (`make demo`): the seeded street scenes of tools/generate_scenes.py
# (nuScenes layout, 32-beam ray-cast scans, no sweeps) and a CenterPoint-pillar detector sized so
# that a teacher and three students train on 2 CPU cores within the demo's 20 minutes:
# the teacher's widths are half of mmdet3d's nuScenes
# pillar model (1.6M parameters); +-32 m at 0.32 m pillars (200x200 BEV grid, 50x50 heads at 1.28 m), six classes in four tasks.
# Teacher and student configs in configs/demo/ change widths only, so every model sees the same
# input and the cached teacher maps line up with the student's grid.
custom_imports = dict(imports=['trainer.evaluation'], allow_failed_imports=False)

data_root = 'data/generated/demo/'
point_cloud_range = [-32.0, -32.0, -5.0, 32.0, 32.0, 3.0]
voxel_size = [0.32, 0.32, 8.0]
grid_size = [200, 200, 1]
out_size_factor = 4
class_names = ['car', 'truck', 'bicycle', 'pedestrian', 'barrier', 'traffic_cone']
metainfo = dict(classes=class_names)
input_modality = dict(use_lidar=True, use_camera=False)
data_prefix = dict(pts='samples/LIDAR_TOP', sweeps='sweeps/LIDAR_TOP')
backend_args = None
# x, y, z, intensity; the generator's fifth column is the ring index, which a pillar net should not
# key on (nuScenes models replace it with the sweep time, and these scans have no sweeps).
use_dim = 4

model = dict(
    type='CenterPoint',
    data_preprocessor=dict(
        type='Det3DDataPreprocessor',
        voxel=True,
        voxel_layer=dict(max_num_points=20, voxel_size=voxel_size, point_cloud_range=point_cloud_range,
                         max_voxels=(16000, 20000))),
    pts_voxel_encoder=dict(
        type='PillarFeatureNet', in_channels=use_dim, feat_channels=[32], with_distance=False,
        voxel_size=voxel_size, point_cloud_range=point_cloud_range,
        norm_cfg=dict(type='BN1d', eps=1e-3, momentum=0.01), legacy=False),
    pts_middle_encoder=dict(type='PointPillarsScatter', in_channels=32, output_shape=grid_size[:2]),
    pts_backbone=dict(
        type='SECOND', in_channels=32, out_channels=[32, 64, 128], layer_nums=[3, 5, 5], layer_strides=[2, 2, 2],
        norm_cfg=dict(type='BN', eps=1e-3, momentum=0.01), conv_cfg=dict(type='Conv2d', bias=False)),
    pts_neck=dict(
        type='SECONDFPN', in_channels=[32, 64, 128], out_channels=[64, 64, 64], upsample_strides=[0.5, 1, 2],
        norm_cfg=dict(type='BN', eps=1e-3, momentum=0.01), upsample_cfg=dict(type='deconv', bias=False),
        use_conv_for_no_stride=True),
    pts_bbox_head=dict(
        type='CenterHead',
        in_channels=192,
        tasks=[
            dict(num_class=1, class_names=['car']),
            dict(num_class=1, class_names=['truck']),
            dict(num_class=2, class_names=['bicycle', 'pedestrian']),
            dict(num_class=2, class_names=['barrier', 'traffic_cone']),
        ],
        common_heads=dict(reg=(2, 2), height=(1, 2), dim=(3, 2), rot=(2, 2), vel=(2, 2)),
        share_conv_channel=64,
        bbox_coder=dict(
            type='CenterPointBBoxCoder', post_center_range=[-40.0, -40.0, -10.0, 40.0, 40.0, 10.0], max_num=500,
            score_threshold=0.1, out_size_factor=out_size_factor, voxel_size=voxel_size[:2],
            pc_range=point_cloud_range[:2], code_size=9),
        separate_head=dict(type='SeparateHead', init_bias=-2.19, final_kernel=3),
        loss_cls=dict(type='mmdet.GaussianFocalLoss', reduction='mean'),
        loss_bbox=dict(type='mmdet.L1Loss', reduction='mean', loss_weight=0.25),
        norm_bbox=True),
    train_cfg=dict(pts=dict(
        grid_size=grid_size, voxel_size=voxel_size, point_cloud_range=point_cloud_range,
        out_size_factor=out_size_factor, dense_reg=1, gaussian_overlap=0.1, max_objs=200, min_radius=2,
        code_weights=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2])),
    test_cfg=dict(pts=dict(
        post_center_limit_range=[-40.0, -40.0, -10.0, 40.0, 40.0, 10.0], max_per_img=200, max_pool_nms=False,
        min_radius=[4, 12, 0.85, 0.175], score_threshold=0.1, pc_range=point_cloud_range[:2],
        out_size_factor=out_size_factor, voxel_size=voxel_size[:2], nms_type='rotate', pre_max_size=1000,
        post_max_size=83, nms_thr=0.2)))

train_pipeline = [
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=use_dim, backend_args=backend_args),
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True, with_attr_label=False),
    dict(type='GlobalRotScaleTrans', rot_range=[-0.3925, 0.3925], scale_ratio_range=[0.95, 1.05],
         translation_std=[0, 0, 0]),
    dict(type='RandomFlip3D', sync_2d=False, flip_ratio_bev_horizontal=0.5, flip_ratio_bev_vertical=0.5),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectNameFilter', classes=class_names),
    dict(type='PointShuffle'),
    dict(type='Pack3DDetInputs', keys=['points', 'gt_bboxes_3d', 'gt_labels_3d']),
]
test_pipeline = [
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=use_dim, backend_args=backend_args),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='Pack3DDetInputs', keys=['points']),
]


def _dataset(split, pipeline, test_mode):
    return dict(
        type='NuScenesDataset', data_root=data_root, ann_file=f'nuscenes_infos_{split}.pkl', pipeline=pipeline,
        metainfo=metainfo, modality=input_modality, data_prefix=data_prefix, test_mode=test_mode,
        use_valid_flag=False, box_type_3d='LiDAR', backend_args=backend_args)


train_dataloader = dict(
    batch_size=2, num_workers=1, persistent_workers=True, sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=_dataset('train', train_pipeline, False))
# Evaluation is a separate step (trainer.evaluation.evaluate_checkpoint on the test_* entries, which
# score the val split): no validation loop inside `featcache train`, which would cost every run a
# pass over the val scans.
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = dict(
    batch_size=1, num_workers=1, persistent_workers=False, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False), dataset=_dataset('val', test_pipeline, True))
test_evaluator = dict(type='CenterDistanceMetric', max_range=32.0)
test_cfg = dict()
del _dataset

max_epochs = 4
lr = 2e-3
train_cfg = dict(by_epoch=True, max_epochs=max_epochs)
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=lr, weight_decay=0.01),
                     clip_grad=dict(max_norm=35, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', T_max=max_epochs, eta_min=lr * 1e-2, begin=0, end=max_epochs, by_epoch=True),
]
default_scope = 'mmdet3d'
default_hooks = dict(
    timer=dict(type='IterTimerHook'), logger=dict(type='LoggerHook', interval=10),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
log_processor = dict(type='LogProcessor', window_size=10, by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
vis_backends = [dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')]
visualizer = dict(type='Det3DLocalVisualizer', vis_backends=vis_backends, name='visualizer')
randomness = dict(seed=0, deterministic=False)
