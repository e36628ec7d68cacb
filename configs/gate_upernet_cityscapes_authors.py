# GATE + UPerNet on CityScapes with the GATE authors' settings from their released
# `segmentation/configs/gate_city.py` (Darkbblue/diffusion-content-shift @81a7cae, over
# generic-diffusion-feature's `_base_` @e4361a6) wherever they are settings, not bugs:
# - the prompt alone, no class names appended;
# - every 1024x1024 crop seen by Stable Diffusion at 512x512 (their `img_size=512`;
#   input_scale=0.5: strides 16, 32, 64 in input pixels);
# - the images resized to 2048x1024 without random scaling (`Resize`, not `RandomResize`);
# - fresh noise at every forward, evaluation included (eval_noise='fresh'), and each
#   variant its own (variant_noise='independent': their variants are separate model copies);
# - the assigner's convolution with PyTorch's default initialisation;
# - PolyLR down to eta_min 1e-4 (from 1.6e-4: the rate barely decays);
# - slide test with 1024x1024 windows at stride 512.
# Not reproduced, because they are bugs: see configs/gate_upernet_ade20k_authors.py.
_base_ = ['./gate_upernet_cityscapes.py']
crop_size = (1024, 1024)
model = dict(
    backbone=dict(
        source=dict(append_class_names=False, variant_noise='independent', input_scale=0.5),
        eval_noise='fresh',
        assigner_cfg=dict(conv_init='pytorch')),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(512, 512)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='Resize', scale=(2048, 1024), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=80000, by_epoch=False)
]
