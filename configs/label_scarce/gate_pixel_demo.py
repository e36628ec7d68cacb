# The label-scarce protocol at toy scale on the CPU: the demo's tiny SD, LoRA and ADM
# (`bash tools/demo.sh`, or `python tools/make_demo.py` and
# `python tools/train_lora.py configs/lora/demo.py`) on 20 + 20 synthetic images in
# DDPM-segmentation's layout (5 classes, all scored). Same recipe as the real configs:
# attention features and cross-attention maps beside ADM features from a store, the pixel
# ensemble with per-member per-pixel amalgamation, the benchmark's metric -- but no guided
# denoising of the ControlNet variant: its ten full passes would make the CPU run several
# times longer (the extractor's tests cover it).
#   python tools/label_scarce.py configs/label_scarce/gate_pixel_demo.py --splits 3
_base_ = ['./_base_/gate_pixel.py']
num_classes = 5
dataset_type = 'DDPMSegDataset'
data_root = 'data/demo/label_scarce'
metainfo = dict(classes=('wall', 'building', 'sky', 'floor', 'tree'))
image_size = (64, 64)
model = dict(
    backbone=dict(
        source=dict(sources=dict(
            sd=dict(
                model='data/demo/tiny-sd',
                prompt='a highly realistic photo of the real world, high quality',
                taps=('up_blocks.0.upsamplers.0', 'up_blocks.1.upsamplers.0',
                      'up_blocks.2.upsamplers.0', 'up_blocks.3.attentions.1'),
                controlnets=dict(canny=dict(model='data/demo/controlnet-canny',
                                            condition=dict(type='canny'))),
                loras=dict(a='data/demo/lora/lora_step100.safetensors'),
                variants=[
                    dict(),
                    dict(prompt='a photo', controlnets=dict(canny=1.0)),
                    dict(prompt='a photo', lora='a'),
                ]),
            # A tiny random ADM in guided-diffusion's checkpoint layout (tools/make_demo.py,
            # mmseg_gate.testing.architectures.TINY_ADM): the LSUN models' layout at CPU
            # size, on the 64x64 images as they are; the SD source upsamples them 2x, as in
            # the real configs.
            adm=dict(model='data/demo/tiny-adm/adm.pt',
                     architecture=dict(image_size=32, model_channels=32, num_res_blocks=2,
                                channel_mult=(1, 1, 2, 2, 2), attention_resolutions=(8, 4, 2),
                                num_head_channels=8, learn_sigma=True))))),
    decode_head=dict(in_channels=[32, 64, 64, 32, 154, 64, 64, 64, 64, 64],
                     num_classes=num_classes, feature_size=64, num_classifiers=4))
train_pipeline = [
    dict(type='LoadAnyImage'),
    dict(type='Resize', scale=image_size, keep_ratio=False),
    dict(type='LoadNpyAnnotations'),
    dict(type='IgnoreSmallRegions', min_pixels=20),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadAnyImage'),
    dict(type='Resize', scale=image_size, keep_ratio=False),
    dict(type='LoadNpyAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(type=dataset_type, data_root=data_root, metainfo=metainfo,
                 pipeline=train_pipeline))
test_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(type=dataset_type, data_root=data_root, metainfo=metainfo,
                 pipeline=test_pipeline))
# The paper's pixel ensemble at toy scale: 3 members, one epoch each (early stopping from the
# start), so that a split takes seconds on the CPU.
pixel_ensemble = dict(num_members=3, max_epochs=1, min_epochs=0)
fixed_split = None  # all of the demo's images (20 + 20 from tools/make_demo.py)
max_iters = 100
optim_wrapper = dict(optimizer=dict(lr=2e-3))
train_cfg = dict(max_iters=max_iters)
default_hooks = dict(logger=dict(interval=25),
                     checkpoint=dict(interval=max_iters))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
