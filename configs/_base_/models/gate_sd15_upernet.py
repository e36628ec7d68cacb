# GATE on Stable Diffusion v1.5 with UPerNet, the paper's segmentation head setting.
# Inputs are normalised to [-1, 1] (the VAE's range); the backbone is told the same
# mean/std so it can undo any other normalisation a config may use.
custom_imports = dict(imports=['mmseg_gate'], allow_failed_imports=False)
# MMEngine's Runner with checkpoints that hold plain data only (nothing in them runs), are
# written atomically, load strictly and resume exactly (mmseg_gate/engine/runner.py).
runner_type = 'GATERunner'

norm_cfg = dict(type='SyncBN', requires_grad=True)
pixel_mean = [127.5, 127.5, 127.5]
pixel_std = [127.5, 127.5, 127.5]
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=pixel_mean,
    std=pixel_std,
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
# Outputs for the default taps on SD1.5: (640, 1280, 1280) channels at strides (8, 16, 32).
gate_channels = [640, 1280, 1280]
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='GATEBackbone',
        # The frozen half (mmseg_gate/sources/): GATE's guided Stable Diffusion features.
        source=dict(
            type='StableDiffusionSource',
            # A local diffusers folder (see docs/segmentation.md) or the hub id.
            model='stable-diffusion-v1-5/stable-diffusion-v1-5',
            prompt='',
            taps=('up_blocks.0.upsamplers.0', 'up_blocks.1.upsamplers.0',
                  'up_blocks.2.upsamplers.0'),
            timestep=50,
            frozen_dtype='auto'),
        noise_seed=0,
        input_mean=pixel_mean,
        input_std=pixel_std,
        num_refine_blocks=1,
        norm_cfg=norm_cfg),
    decode_head=dict(
        type='UPerHead',
        in_channels=gate_channels,
        in_index=[0, 1, 2],
        pool_scales=(1, 2, 3),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=[
            dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            dict(type='LovaszLoss', reduction='none', loss_weight=1.0),
        ]),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=gate_channels[1],
        in_index=1,
        channels=512,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
