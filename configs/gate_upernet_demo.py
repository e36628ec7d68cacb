# The embedded demo: the ADE20K recipe, with the paper's three GATE variants, at toy scale on
# the CPU. `python tools/make_demo.py` writes its data (ADE20K layout), the tiny Stable
# Diffusion and a Canny ControlNet for it; `python tools/train_lora.py configs/lora/demo.py`
# trains its two LoRAs; `bash tools/demo.sh` runs everything.
_base_ = [
    './_base_/models/gate_sd15_upernet.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    './_base_/gate_recipe.py',
]
data_root = 'data/demo/ade/ADEChallengeData2016'
num_classes = 5  # GATEDemoDataset: wall, building, sky, floor, tree (ADE20K ids 1-5)
crop_size = (64, 64)
scale = (128, 96)
data_preprocessor = dict(size=crop_size)
tiny_channels = [64, 64, 64]  # the tiny UNet's up blocks 0-2 (strides 8, 16, 32)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        source=dict(
            model='data/demo/tiny-sd',
            prompt='a highly realistic photo of the real world. It can be an indoor scene, '
            'or an outdoor scene, or a photo of nature. high quality.',
            class_names=('wall', 'building', 'sky', 'floor', 'tree'),
            append_class_names=True,
            controlnets=dict(canny=dict(model='data/demo/controlnet-canny',
                                        condition={{_base_.gate_canny}})),
            loras=dict(a='data/demo/lora/lora_step100.safetensors',
                       b='data/demo/lora/lora_step200.safetensors'),
            variants={{_base_.gate_variants}}),
        norm_cfg=dict(type='BN', requires_grad=True)),
    decode_head=dict(in_channels=tiny_channels, channels=32, num_classes=num_classes,
                     norm_cfg=dict(type='BN', requires_grad=True)),
    auxiliary_head=dict(in_channels=tiny_channels[1], channels=32, num_classes=num_classes,
                        norm_cfg=dict(type='BN', requires_grad=True)),
    test_cfg=dict(mode='whole'))

# Colour identifies the demo classes, so no PhotoMetricDistortion here.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=scale, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(type='GATEDemoDataset', data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(type='GATEDemoDataset', data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

max_iters = 600
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-3))
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=25, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters),
    visualization=dict(type='SegVisualizationHook', draw=False))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
