# DiTF's zero-shot SPair-71k protocol (Gan et al., "Unleashing Diffusion Transformers for
# Visual Correspondence by Modulating Massive Activations", NeurIPS 2025; their
# `eval_spair.py`, read in ganchaofan0000/DiTF), as close as this toolkit runs it:
# - FLUX.1-dev in bfloat16, the image tokens entering DiTF's "block 28" (counted over the 19
#   double- then the 38 single-stream blocks): the output of `single_transformer_blocks.8`,
#   treated as DiTF does -- channels 154 and 1446 zeroed, LayerNorm, then the shift and scale
#   of `single_transformer_blocks.9`'s own AdaLN (mmseg_gate/sources/dit/massive.py);
# - noise level sigma = 260 / 1000 exactly (no resolution shift), guidance 3.5, T5 at 512
#   tokens, an ensemble of 8 noise draws per image averaged before the treatment;
# - the longer side resized to 640, both sides multiples of 16 (bicubic, as PIL's default);
# - matching as DIFT's evaluation: both maps upsampled (bilinear) to their image's original
#   size, the source keypoint's vector at its pixel, cosine argmax over every target pixel;
#   PCK@0.1 of the target's bounding box, per point and per image (per pair), over SPair's
#   whole test split (12,234 pairs).
# What still differs (per-image captions, the VAE posterior sample): docs/correspondence.md.
#   python tools/correspondence.py zero-shot configs/correspondence/ditf_spair.py
source = dict(
    type='FluxSource',
    model='black-forest-labs/FLUX.1-dev',
    prompt='',  # DiTF: a detailed caption per image (not supported here; see the docs)
    taps=('single_transformer_blocks.8', ),
    timestep=260,
    timestep_shift=False,
    guidance_scale=3.5,
    max_sequence_length=512,
    tap_transform='adaln',
    discard_channels=[154, 1446],  # DiTF's, hard-coded for FLUX.1-dev; 'auto' finds them
    ensemble_size=8,
    frozen_dtype='bfloat16')
data = dict(
    root='data/SPair-71k',
    split_files='spair',
    resize='longest',
    image_size=640,
    size_multiple=16,
    train_split='trn',
    val_split='val',
    val_per_category=20,
    test_split='test',
    test_per_category=None)
matching = dict(size='original', pixel_centres=False)
alpha = 0.1
train = dict(seed=0)  # the noise seed; nothing is trained
feature_cache = 64
num_match_pictures = 6
work_dir = 'work_dirs/correspondence/ditf_spair'
