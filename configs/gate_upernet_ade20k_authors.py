# GATE + UPerNet on ADE20K with the GATE authors' settings from their released
# `segmentation/configs/gate_ade.py` (Darkbblue/diffusion-content-shift @81a7cae, over
# generic-diffusion-feature's `_base_` @e4361a6) wherever they are settings, not bugs:
# - the prompt alone, no class names appended;
# - fresh noise at every forward, evaluation included (eval_noise='fresh'), and each
#   variant its own (variant_noise='independent': their variants are separate model copies);
# - the assigner's convolution with PyTorch's default initialisation;
# - PolyLR down to eta_min 1e-4 (from 1.6e-4: the rate barely decays);
# - slide test with 512x512 windows at stride 512 (no overlap).
# Not reproduced, because they are bugs (docs/segmentation.md, "what differs from the authors'
# run"): the released config's `DiffusionSegmentor` never passes the ControlNet or the LoRAs and
# concatenates the three variants (here the paper's recipe: prompt-only, Canny + LoRA A, Canny +
# LoRA B, amalgamated), UPerHead fed from low to high resolution, refinement blocks with every
# weight zero and one block shared by all levels, `seg_pad_val=1`.
_base_ = ['./gate_upernet_ade20k.py']
crop_size = (512, 512)
model = dict(
    backbone=dict(
        source=dict(append_class_names=False, variant_noise='independent'),
        eval_noise='fresh',
        assigner_cfg=dict(conv_init='pytorch')),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(512, 512)))
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=80000, by_epoch=False)
]
