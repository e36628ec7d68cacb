# GATE prompt-only (one variant, no ControlNet/LoRA: runs without LoRA files) + UPerNet on CityScapes, 1024x1024 crops of the 2048x1024
# images at native resolution, 80k iterations, batch 2.
_base_ = [
    './_base_/models/gate_sd15_upernet.py',
    'mmseg::_base_/datasets/cityscapes_1024x1024.py',
    'mmseg::_base_/default_runtime.py',
    './_base_/schedules/gate_adamw_80k.py',
]
crop_size = (1024, 1024)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        source=dict(
            prompt='An urban street scene with multiple lanes, various buildings, traffic '
            'lights, cars in the lanes, and pedestrians, highly realistic.')),
    decode_head=dict(num_classes=19),
    auxiliary_head=dict(num_classes=19),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(768, 768)))
train_dataloader = dict(batch_size=2)
