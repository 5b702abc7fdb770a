# The coarse student (student_coarse.py: its own 0.4 m pillar grid, it cannot inherit) trained twice as long:
# 8 epochs, 1,600 iterations of 2 scans, under the same per-iteration cosine to 1e-3 of the peak rate. At 800
# iterations the demo students are limited by what they learn per step, not by scans; a teacher's soft targets
# are known to pay off more the longer a student learns from them ("a good teacher is patient"), so both arms
# of the comparison train this schedule.
_base_ = ['./student_coarse.py']

max_epochs = 8
train_cfg = dict(by_epoch=True, max_epochs=max_epochs)
lr = 2e-3
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', T_max=max_epochs, eta_min=lr * 1e-3, begin=0, end=max_epochs, by_epoch=True,
         convert_to_iter_based=True),
]
