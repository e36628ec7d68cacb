"""Stable Diffusion architectures, written out with random weights in diffusers format.

No weights can be downloaded in tests, CI or ``tools/benchmark.py --random-init``. These
functions build the components from their architecture configs with random weights and save
them as a diffusers folder, which then loads through the same ``from_pretrained`` path as real
weights. ``sd15`` is Stable Diffusion v1.5's architecture (same FLOPs as the real model);
``tiny`` keeps its layout (4 down/up blocks, cross-attention, 8x VAE) at a CPU-friendly size.
The VAE's latent scaling factor is calibrated to unit-variance latents, as SD's own was.
The tokenizer is CLIP's real BPE vocabulary (the one SD1.5 uses), which MMSeg ships.
"""
import gzip
import json
import os
import os.path as osp
from typing import Dict

import torch
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

_SD_BLOCKS = dict(
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                      'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D',
                    'CrossAttnUpBlock2D'),
)
_VAE_BLOCKS = dict(down_block_types=('DownEncoderBlock2D', ) * 4,
                   up_block_types=('UpDecoderBlock2D', ) * 4, latent_channels=4,
                   in_channels=3, out_channels=3)

ARCHITECTURES: Dict[str, dict] = {
    'sd15': dict(
        unet=dict(_SD_BLOCKS, sample_size=64, in_channels=4, out_channels=4,
                  block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        vae=dict(_VAE_BLOCKS, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 norm_num_groups=32, sample_size=512, scaling_factor=0.18215),
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, projection_dim=768, hidden_act='quick_gelu'),
    ),
    'tiny': dict(
        unet=dict(_SD_BLOCKS, sample_size=16, in_channels=4, out_channels=4,
                  block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16),
        vae=dict(_VAE_BLOCKS, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                 norm_num_groups=8, sample_size=128, scaling_factor=0.18215),
        text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, projection_dim=32, hidden_act='quick_gelu'),
    ),
}
# Stable Diffusion v1.x's noise schedule.
_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                  num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                  set_alpha_to_one=False)


def save_clip_tokenizer(folder: str) -> CLIPTokenizer:
    """Write CLIP's tokenizer (vocab.json + merges.txt, 49,408 tokens) from MMSeg's BPE file."""
    from mmseg.utils.tokenizer import bytes_to_unicode
    import mmseg.utils
    bpe = osp.join(osp.dirname(mmseg.utils.__file__), 'bpe_simple_vocab_16e6.txt.gz')
    lines = gzip.open(bpe).read().decode('utf-8').split('\n')
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + '</w>' for t in byte_tokens]
    vocab += [''.join(m.split()) for m in merges] + ['<|startoftext|>', '<|endoftext|>']
    os.makedirs(folder, exist_ok=True)
    with open(osp.join(folder, 'vocab.json'), 'w', encoding='utf-8') as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(osp.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
        f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
    tokenizer = CLIPTokenizer(osp.join(folder, 'vocab.json'), osp.join(folder, 'merges.txt'),
                              model_max_length=77, pad_token='<|endoftext|>')
    tokenizer.save_pretrained(folder)
    return tokenizer


@torch.no_grad()
def unit_variance_scaling(vae: AutoencoderKL, seed: int = 0) -> float:
    """The latent scaling factor giving unit-variance latents, found the way SD's 0.18215 was
    (1 / std of latents of sample images; here smooth random images). Without it a random
    VAE's latents are drowned by even the light noise of t=50."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(8, 3, 8, 8, generator=generator) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(64, 64), mode='bilinear')
    latents = vae.encode(images).latent_dist.mode()
    return float(1.0 / latents.std())


def save_random_stable_diffusion(folder: str, arch: str = 'tiny', seed: int = 0) -> str:
    """Write a randomly initialised Stable Diffusion of ``arch`` to ``folder`` (diffusers
    format, safetensors) and return ``folder``."""
    if arch not in ARCHITECTURES:
        raise KeyError(f'Unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}.')
    spec = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    tokenizer = save_clip_tokenizer(osp.join(folder, 'tokenizer'))
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77,
                                 bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **spec['text_encoder'])
    CLIPTextModel(text_config).save_pretrained(osp.join(folder, 'text_encoder'))
    UNet2DConditionModel(**spec['unet']).save_pretrained(osp.join(folder, 'unet'))
    vae = AutoencoderKL(**spec['vae'])
    vae.register_to_config(scaling_factor=unit_variance_scaling(vae))
    vae.save_pretrained(osp.join(folder, 'vae'))
    PNDMScheduler(**_SCHEDULER).save_pretrained(osp.join(folder, 'scheduler'))
    with open(osp.join(folder, 'model_index.json'), 'w') as f:
        json.dump({'_class_name': 'StableDiffusionPipeline',
                   'scheduler': ['diffusers', 'PNDMScheduler'],
                   'text_encoder': ['transformers', 'CLIPTextModel'],
                   'tokenizer': ['transformers', 'CLIPTokenizer'],
                   'unet': ['diffusers', 'UNet2DConditionModel'],
                   'vae': ['diffusers', 'AutoencoderKL']}, f, indent=2)
    return folder


@torch.no_grad()
def save_random_controlnet(folder: str, sd_folder: str, seed: int = 0) -> str:
    """A ControlNet for the UNet at ``sd_folder`` (diffusers' ``from_unet``), saved to
    ``folder``. Its zero convolutions get small random weights, as training gives a real
    ControlNet: left at zero it would add nothing."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder='unet',
                                                use_safetensors=True)
    controlnet = ControlNetModel.from_unet(unet)
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.02)
    controlnet.save_pretrained(folder)
    return folder


# LoCon-style targets: attention projections and the ResNet convolutions.
LORA_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out.0', 'conv1', 'conv2')


def save_random_lora(path: str, sd_folder: str, rank: int = 4, seed: int = 0) -> str:
    """A LoRA with random, non-zero factors for the UNet at ``sd_folder``, in diffusers'
    LoRA file format (``alpha = rank``): the stand-in for a trained adapter."""
    from peft import LoraConfig

    from .lora import save_lora_file
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder='unet',
                                                use_safetensors=True)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=list(LORA_TARGETS)))
    return save_lora_file(unet, path)
