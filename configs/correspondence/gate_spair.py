# Semantic correspondence on SPair-71k with GATE features (the authors' `correspondence_gate`
# recipe): SD1.5 at 512x512, t = 50, the upsampler outputs of up blocks 0-2, the last
# transformer output of up block 3 and the up blocks' cross-attention maps; the authors' six
# variants (below). Their cross-attention maps come from a separate ControlNet + LoRA run with
# the category prompt; here every variant brings its own (README, differences).
# Aggregation: GATE's amalgamation per level + Diffusion Hyperfeatures' bottlenecks (384
# channels) and level mixing; symmetric keypoint loss at temperature 0.07, AdamW 5e-4, weight
# decay 0.01, 10,000 steps of one pair, validation every 500 steps.
#   python tools/correspondence.py train configs/correspondence/gate_spair.py
#   python tools/correspondence.py zero-shot configs/correspondence/gate_spair.py
_categories = ('aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, dog, horse, '
               'motorbike, person, potted plant, sheep, train, tv monitor')
source = dict(
    type='StableDiffusionSource',
    sd_model='stable-diffusion-v1-5/stable-diffusion-v1-5',
    prompt=f'a photo of {_categories}, high quality, best quality, highly realistic, '
    'masterpiece, high resolution',
    controlnets=dict(canny=dict(model='lllyasviel/sd-controlnet-canny',
                                condition=dict(type='canny'))),
    loras=dict(a='work_dirs/lora/spair/lora_step1500.safetensors',
               b='work_dirs/lora/spair/lora_step3000.safetensors'),
    # The authors' six: the fine-grained prompt with two noise seeds, "a photo" with each
    # LoRA, "a photo" with the Canny ControlNet denoised from t = 60, with two noise seeds.
    variants=[
        dict(),
        dict(noise_seed=1),
        dict(prompt='a photo', lora='a'),
        dict(prompt='a photo', lora='b'),
        dict(prompt='a photo', controlnets=dict(canny=1.0), denoising_from=60),
        dict(prompt='a photo', controlnets=dict(canny=1.0), denoising_from=60, noise_seed=1),
    ],
    taps=('up_blocks.0.upsamplers.0', 'up_blocks.1.upsamplers.0', 'up_blocks.2.upsamplers.0',
          'up_blocks.3.attentions.2'),
    attention_maps=dict(places=('up', ), strides=(32, 16), tokens=77),
    timestep=50,
    frozen_dtype='auto')
data = dict(
    root='data/SPair-71k',
    image_size=512,
    train_split='trn',
    val_split='val',
    val_per_category=20,  # 360 validation pairs for model selection, as DHF
    test_split='test',
    test_per_category=None)  # all 12,234 test pairs
aggregator = dict(projection_dim=384, num_assigners=1)
train = dict(steps=10000, lr=5e-4, weight_decay=0.01, temperature=0.07, sparsity=0.0,
             val_every=500, seed=0)
alpha = 0.1
feature_cache = 256  # images whose features are kept in memory
num_match_pictures = 6
work_dir = 'work_dirs/correspondence/gate_spair'
