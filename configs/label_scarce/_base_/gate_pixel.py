# DDPM-segmentation's label-scarce protocol on GATE features, as the authors'
# `scarce_segmentation_gate` runs it: SD1.5 at 512x512, t = 50 (the ControlNet variant of each
# dataset config is denoised from t = 60 with its guidance, as theirs), the upsampler outputs
# of up blocks 0-2, the last transformer output of up block 3 and the up blocks' aggregated
# cross-attention maps (strides 32 and 16, 77 tokens each: the authors' `up_cross`), beside
# DDPM-segmentation's ADM features; an ensemble of 10 pixel classifiers, each amalgamating
# the variants per pixel, on features read at the labels' 256x256, where predictions are
# scored. docs/label_scarce.md lists what still differs from their pipeline.
custom_imports = dict(imports=['mmseg_gate'], allow_failed_imports=False)
default_scope = 'mmseg'
runner_type = 'GATERunner'

pixel_mean = [127.5, 127.5, 127.5]
pixel_std = [127.5, 127.5, 127.5]
# The benchmark's images stay at their 256x256 (the Resize is the identity on them): ADM
# sees them as DDPM-segmentation does, and the SD source upsamples them to its 512x512
# itself (input_scale=2).
image_size = (256, 256)
norm_cfg = dict(type='BN', requires_grad=True)
num_classes = 21
data_preprocessor = dict(type='SegDataPreProcessor', mean=pixel_mean, std=pixel_std,
                         bgr_to_rgb=True, pad_val=0, seg_pad_val=255,
                         size_divisor=1)  # images come resized: nothing to pad
model = dict(
    type='GATEEncoderDecoder',
    # The authors' sparsity term (their lambda random-walks from 0 in steps of 1e-5).
    amalgamation_regularizer=dict(sparsity=1e-3),
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='GATEBackbone',
        # Two frozen sources side by side, as the authors concatenate them: Stable Diffusion
        # with GATE's variants, and DDPM-segmentation's ADM (its three steps as variants).
        # Each keeps its own amalgamation. Drop the ADM (SD-only features) with
        # `--cfg-options model.backbone.source.sources.adm=None`.
        source=dict(
            type='CompositeSource',
            mode='separate',
            sources=dict(
                sd=dict(
                    type='StableDiffusionSource',
                    model='stable-diffusion-v1-5/stable-diffusion-v1-5',
                    taps=('up_blocks.0.upsamplers.0', 'up_blocks.1.upsamplers.0',
                          'up_blocks.2.upsamplers.0', 'up_blocks.3.attentions.2'),
                    attention_maps=dict(places=('up', ), strides=(32, 16), tokens=77),
                    timestep=50,
                    input_scale=2.0,
                    # Each variant its own noise, as the authors' runs (one per variant).
                    variant_noise='independent',
                    frozen_dtype='auto'),
                # guided-diffusion's LSUN ADM (each dataset config names its checkpoint):
                # output blocks 5, 6, 7, 8, 12 (2,816 channels) at steps 50, 150, 250 with
                # DDPM-segmentation's shared noise (seed 0), on the 256x256 images as they
                # are.
                adm=dict(
                    type='ADMSource',
                    model='checkpoints/ddpm/lsun_horse.pt',
                    taps=(5, 6, 7, 8, 12),
                    steps=(50, 150, 250),
                    input_scale=1.0,
                    share_noise=True,
                    noise_seed=0,
                    frozen_dtype='auto'))),
        noise_seed=0,
        input_mean=pixel_mean,
        input_std=pixel_std,
        num_refine_blocks=0,  # the benchmark's classifier sees the amalgamated features
        norm_cfg=norm_cfg),
    decode_head=dict(
        type='PixelClassifierHead',
        # The backbone's outputs, finest first (by stride; SD's before ADM's within one):
        # SD1.5 640 + 320 + 154 (cross-attention maps) + 1280 + 1280 = 3,674 and ADM
        # 256 + 512 + 1024 + 512 + 512 = 2,816 per pixel.
        in_channels=[256, 640, 320, 154, 512, 1280, 1024, 512, 512, 1280],
        num_classes=num_classes,
        feature_size=256,
        num_classifiers=10,
        ensemble='vote',
        ignore_index=255,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0,
                         avg_non_ignore=True)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

dataset_type = 'Horse21Dataset'
data_root = 'datasets/horse_21'
# Images and labels keep the benchmark's 256x256, where the loss and the metric are
# computed. `LoadAnyImage` is
# MMCV's LoadImageFromFile on the project's reader (16-bit, palette, RGBA right; a broken
# file named).
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
    batch_size=2, num_workers=2, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root,
                 data_prefix=dict(img_path='real/train', seg_map_path='real/train'),
                 pipeline=train_pipeline))
test_dataloader = dict(
    batch_size=1, num_workers=2, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root,
                 data_prefix=dict(img_path='real/test', seg_map_path='real/test'),
                 pipeline=test_pipeline))
# The benchmark's mIoU (DDPM-segmentation's compute_iou: every class scored, an absent one as
# 0; ignored pixels counted in the union of the class predicted there), reported as `mIoU`;
# MMSeg's IoUMetric beside it as `mmseg/mIoU` (present classes only, ignored pixels dropped).
test_evaluator = [dict(type='BenchmarkIoUMetric', ignore_index=255),
                  dict(type='IoUMetric', iou_metrics=['mIoU'], prefix='mmseg')]
# DDPM-segmentation's fixed split (experiments/horse_21/ddpm.json: training_number 30,
# testing_number 30, the files in sorted order); the random re-splits keep these sizes.
fixed_split = dict(num_train=30, num_test=30)
# The benchmark has no validation set: train, then test (tools/label_scarce.py).
val_dataloader = val_evaluator = val_cfg = None

# The paper's classifier training (mmseg_gate/protocols/pixel_training.py): every member on
# its own, with the authors' per-pixel amalgamation of the variants inside it and its own
# sparsity term (lambda random-walking from 0), on random 64-pixel batches of every training
# pixel read from the feature store, Adam 1e-3, at most 100 epochs, early stopping from the
# fifth epoch (more than 50 batches without a new best batch loss), the majority vote at the
# labels' 256x256. The SD maps are read as the authors' extraction leaves them: resized
# nearest-neighbour to the variant's largest map (64x64), then bilinearly to 256x256
# (`nearest_first=()`: bilinear from the native 16/32/64 maps); ADM's bilinearly, as
# DDPM-segmentation's. `--cfg-options pixel_ensemble=None` trains the MMSeg segmentor below
# (GATEBackbone's per-level amalgamation + PixelClassifierHead) on whole images instead.
pixel_ensemble = dict(num_members=10, seed=0, batch_size=64, lr=1e-3, max_epochs=100,
                      min_epochs=4, patience=50, sparsity='random_walk',
                      member=dict(assigner_hidden=128, dropout=0.5), nearest_first=('sd', ))

# The segmentor's training (pixel_ensemble=None): about 100 epochs of the training images at batch 2 (the benchmark's MLPs: Adam 1e-3, at
# most 100 epochs of 64-pixel batches, early stopping on the training loss).
max_iters = 1500
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='Adam', lr=1e-3))
param_scheduler = []
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=500, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook', draw=False))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
# No fixed name: each split's runner gets its own visualizer.
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends)
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
