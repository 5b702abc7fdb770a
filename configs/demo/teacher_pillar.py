# Demo teacher: CenterPoint-pillar at half the widths of mmdet3d's nuScenes pillar model (all of it is
# defined in the base so that students only state what they change). Trained by
# tools/train_demo_teacher.sh on the generated scenes; `make demo` uses the checkpoint it writes.
_base_ = ['../_base_/demo_scenes.py']

# The teacher trains longer than the students (20 epochs of the 400 generated training scans).
max_epochs = 20
lr = 2e-3
train_cfg = dict(by_epoch=True, max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', T_max=max_epochs, eta_min=lr * 1e-2, begin=0, end=max_epochs, by_epoch=True),
]
train_dataloader = dict(batch_size=4)
