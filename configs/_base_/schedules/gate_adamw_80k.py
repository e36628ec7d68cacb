# The paper's optimisation: AdamW lr 1.6e-4, weight decay 1e-3, poly (power 0.9), 80k
# iterations. Only the refinement blocks and heads train; the diffusion parts are frozen.
_base_ = ['mmseg::_base_/schedules/schedule_80k.py']

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1.6e-4, betas=(0.9, 0.999), weight_decay=1e-3),
    clip_grad=None)
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=80000, by_epoch=False)
]
