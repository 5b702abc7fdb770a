# A student config made from mmdet3d's packaged KITTI PointPillars (car): what a packaged detector
# config needs before `featcache train` can run it on a split of your own (README, "What a student
# config needs"). Point the loaders at the data with --cfg-options (the train set is a RepeatDataset:
# train_dataloader.dataset.dataset.data_root=..., ann_file=...).
_base_ = ['mmdet3d::pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car.py']

point_cloud_range = [0, -39.68, -3, 69.12, 39.68, 1]
class_names = ['Car']
# no ObjectSample: it pastes objects from a GT database (kitti_dbinfos_train.pkl) a small or new split
# does not have
train_pipeline = [
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=4, use_dim=4),
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True),
    dict(type='RandomFlip3D', flip_ratio_bev_horizontal=0.5),
    dict(type='GlobalRotScaleTrans', rot_range=[-0.78539816, 0.78539816], scale_ratio_range=[0.95, 1.05]),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='PointShuffle'),
    dict(type='Pack3DDetInputs', keys=['points', 'gt_bboxes_3d', 'gt_labels_3d']),
]
train_dataloader = dict(batch_size=2, num_workers=1, dataset=dict(times=1, dataset=dict(pipeline=train_pipeline)))
# mmengine builds the val loop (and its KITTI evaluator, which reads val's ann_file) whenever these are set;
# they go together: all three None, or all three given
val_cfg = None
val_dataloader = None
val_evaluator = None
train_cfg = dict(by_epoch=True, max_epochs=1, val_interval=1)
