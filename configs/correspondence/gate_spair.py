# Semantic correspondence on SPair-71k as the GATE authors' `correspondence_gate` runs it.
# Frozen half, two Stable Diffusion 1.5 sources at 512x512, t = 50:
# - `conv`: their six variants -- the fine-grained prompt with two noise seeds, "a photo" with
#   LoRA a and with LoRA b, "a photo" with the Canny ControlNet denoised from t = 60, with two
#   noise seeds -- each giving the upsampler outputs of up blocks 0-2 and the last transformer
#   output of up block 3 (1280 + 1280 + 640 + 320 = 3,520 channels);
# - `attn`: their separate run for the cross-attention maps (ControlNet + LoRA + the category
#   prompt, denoised from t = 60): the up blocks' maps at strides 32 and 16, 77 tokens each
#   (154 channels), no other taps.
# Their aggregation network ("conv"): one amalgamation of the six variants' 3,520 channels at
# 64x64, the attention maps concatenated unweighted, a 3x3 convolution; the symmetric keypoint
# loss at temperature 0.07, AdamW 5e-4 / 0.01, 2 epochs of 5,000 pairs, their sparsity term,
# a validation on val-360 every 500 steps; matching at 512x512. Diffusion Hyperfeatures' split
# files (train, val-360, test-360) and SPair's whole test split.
#   python tools/correspondence.py train configs/correspondence/gate_spair.py
#   python tools/correspondence.py zero-shot configs/correspondence/gate_spair.py
_categories = ('aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, dog, horse, '
               'motorbike, person, potted plant, sheep, train, tv monitor')
_sd15 = 'stable-diffusion-v1-5/stable-diffusion-v1-5'
_controlnets = dict(canny=dict(model='lllyasviel/sd-controlnet-canny',
                               condition=dict(type='canny')))
source = dict(
    type='CompositeSource',
    mode='separate',
    sources=dict(
        conv=dict(
            type='StableDiffusionSource',
            model=_sd15,
            prompt=f'a photo of {_categories}, high quality, best quality, highly realistic, '
            'masterpiece, high resolution',
            controlnets=_controlnets,
            loras=dict(a='work_dirs/lora/spair/lora_step1500.safetensors',
                       b='work_dirs/lora/spair/lora_step3000.safetensors'),
            variants=[
                dict(),
                dict(noise_seed=1),
                dict(prompt='a photo', lora='a'),
                dict(prompt='a photo', lora='b'),
                dict(prompt='a photo', controlnets=dict(canny=1.0), denoising_from=60),
                dict(prompt='a photo', controlnets=dict(canny=1.0), denoising_from=60,
                     noise_seed=1),
            ],
            taps=('up_blocks.0.upsamplers.0', 'up_blocks.1.upsamplers.0',
                  'up_blocks.2.upsamplers.0', 'up_blocks.3.attentions.2'),
            timestep=50,
            variant_noise='independent',  # theirs: a run per variant, fresh noise
            frozen_dtype='auto'),
        attn=dict(
            type='StableDiffusionSource',
            model=_sd15,
            prompt=f'a photo of {_categories}',
            controlnets=_controlnets,
            loras=dict(a='work_dirs/lora/spair/lora_step1500.safetensors'),
            variants=[dict(controlnets=dict(canny=1.0), lora='a', denoising_from=60)],
            taps=(),
            attention_maps=dict(places=('up', ), strides=(32, 16), tokens=77),
            timestep=50,
            variant_noise='independent',  # theirs: a run per variant, fresh noise
            frozen_dtype='auto')))
data = dict(
    root='data/SPair-71k',
    image_size=512,
    # Diffusion Hyperfeatures' split files, in SPair-71k/JPEGImages as the authors keep them
    # ('spair': SPair's own Layout lists, train_split / val_split / test_split below).
    split_files='dhf',
    dhf_files=dict(train='spair_71k_train.json', val='spair_71k_val-360.json',
                   test='spair_71k_test-360.json'),
    dhf_folder=None,  # default: <root>/JPEGImages
    full_test=True,  # also report SPair's whole test split (12,234 pairs)
    train_split='trn',
    val_split='val',
    val_per_category=20,
    test_split='test',
    test_per_category=None)
aggregator = dict(type='GATEAggregationNetwork', output='conv', grid=64, resize_mode='nearest',
                  bypass=('attn.cross_attention_maps', ),
                  # their assigner's plain nn.Conv2d initialisation
                  assigner_cfg=dict(conv_init='pytorch'))
# Theirs: both maps upsampled to 512x512, keypoints scaled without a half-pixel offset.
matching = dict(size=512, pixel_centres=False)
train = dict(steps=10000, steps_per_epoch=5000, lr=5e-4, weight_decay=0.01, temperature=0.07,
             sparsity='random_walk', val_every=500, seed=0)
alpha = 0.1
feature_cache = 256  # images whose features are kept in memory
num_match_pictures = 6
work_dir = 'work_dirs/correspondence/gate_spair'
