# GATE + UPerNet on ADE20K with SDXL base 1.0 at its native scale: images resized 2x, 1024x1024
# crops (as the authors' SDXL segmentation runs), both text encoders, SDXL's Canny ControlNet
# and LoRAs trained on it (python tools/train_lora.py configs/lora/ade20k_sdxl.py). SDXL's UNet
# has three levels; the taps are the mid block (1280 ch, stride 32) and the upsamplers of up
# blocks 0 (1280 ch, stride 16) and 1 (640 ch, stride 8): the heads see SD1.5's channels.
_base_ = ['./gate_upernet_ade20k.py']
crop_size = (1024, 1024)
scale = (4096, 1024)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        source=dict(
            model='stabilityai/stable-diffusion-xl-base-1.0',
            taps=('mid_block', 'up_blocks.0.upsamplers.0', 'up_blocks.1.upsamplers.0'),
            controlnets=dict(canny=dict(model='diffusers/controlnet-canny-sdxl-1.0')),
            loras=dict(
                a='work_dirs/lora/ade20k_sdxl/lora_step1500.safetensors',
                b='work_dirs/lora/ade20k_sdxl/lora_step3000.safetensors'))),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(683, 683)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
