# GATE features of Stable Diffusion 3.5 (medium: 24 joint blocks, 1,536 channels) + UPerNet on
# ADE20K, 512x512 crops, 80k iterations, batch 2: one prompt variant (GATE's LoRA and
# ControlNet variants can be added: `loras=dict(a=FILE)`, `controlnets=dict(canny=dict(
# model=...))`, `variants=[dict(), dict(lora='a'), dict(controlnets=dict(canny=1.0))]`; no
# LoRA or ControlNet for SD3.5 is shipped with this config). A DiT tap has one stride (16 pixels), so
# MMSeg's own MultiLevelNeck -- the neck its ViT configs use: a 1x1 lateral conv, bilinear
# resizing by 4, 2, 1 and 0.5, a 3x3 conv -- makes the pyramid at strides 4-32 that the stock
# UPerHead takes. The block is mid-depth (12 of 24); compare blocks with
# tools/content_shift.py before a long run.
_base_ = ['./gate_upernet_ade20k_prompt.py']
dit_channels = 1536
pyramid_channels = 768
model = dict(
    backbone=dict(
        source=dict(
            _delete_=True,
            type='DiTSource',
            model='stabilityai/stable-diffusion-3.5-medium',
            prompt='a highly realistic photo of the real world. It can be an indoor scene, '
            'or an outdoor scene, or a photo of nature. high quality.',
            taps=('transformer_blocks.12', ),
            timestep=50,
            frozen_dtype='auto')),
    neck=dict(type='MultiLevelNeck', in_channels=[dit_channels],
              out_channels=pyramid_channels, scales=[4, 2, 1, 0.5]),
    decode_head=dict(in_channels=[pyramid_channels] * 4, in_index=[0, 1, 2, 3]),
    auxiliary_head=dict(in_channels=pyramid_channels, in_index=2))
