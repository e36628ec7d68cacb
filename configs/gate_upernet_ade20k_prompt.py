# GATE prompt-only (one variant, no ControlNet/LoRA: runs without LoRA files) + UPerNet on ADE20K, 512x512 crops, 80k iterations, batch 2.
_base_ = [
    './_base_/models/gate_sd15_upernet.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    './_base_/schedules/gate_adamw_80k.py',
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        source=dict(
            prompt='a highly realistic photo of the real world. It can be an indoor scene, '
            'or an outdoor scene, or a photo of nature. high quality.')),
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))
train_dataloader = dict(batch_size=2)
