"""Stable Diffusion architectures, written out with random weights in diffusers format.

No weights can be downloaded in tests, CI or ``tools/benchmark.py --random-init``. These
functions build the components from their architecture configs with random weights and save
them as a diffusers folder, which then loads through the same ``from_pretrained`` path as real
weights. ``sd15``, ``sd21`` and ``sdxl`` are the real models' architectures (same FLOPs and
memory); ``tiny``, ``tiny-sd21`` and ``tiny-sdxl`` keep their layouts (down/up blocks,
cross-attention, linear projections, SDXL's two text encoders and added time embedding, 8x
VAE) at a CPU-friendly size. The VAE's latent scaling factor is calibrated to unit-variance
latents, as SD's own was. The tokenizer is CLIP's real BPE vocabulary (the one SD uses), which
MMSeg ships.
"""
import gzip
import json
import os
import os.path as osp
from typing import Dict, Optional, Sequence

import torch
from diffusers import (AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, PNDMScheduler,
                       UNet2DConditionModel, UNet2DModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

_SD_BLOCKS = dict(
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                      'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D',
                    'CrossAttnUpBlock2D'),
)
_XL_BLOCKS = dict(
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
)
_VAE_BLOCKS = dict(down_block_types=('DownEncoderBlock2D', ) * 4,
                   up_block_types=('UpDecoderBlock2D', ) * 4, latent_channels=4,
                   in_channels=3, out_channels=3)
_SD_VAE = dict(_VAE_BLOCKS, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
TINY_VAE = dict(_VAE_BLOCKS, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                 norm_num_groups=8, sample_size=128, scaling_factor=0.18215)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, projection_dim=768, hidden_act='quick_gelu')
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, projection_dim=32, hidden_act='quick_gelu')
# Noise schedules: SD1.x/2.x (PNDM as shipped) and SDXL (Euler, "leading" spacing).
_SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                     num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                     set_alpha_to_one=False)
_XL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                     num_train_timesteps=1000, steps_offset=1, timestep_spacing='leading')

ARCHITECTURES: Dict[str, dict] = {
    'sd15': dict(
        unet=dict(_SD_BLOCKS, sample_size=64, in_channels=4, out_channels=4,
                  block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        vae=_SD_VAE, text_encoders=[_CLIP_L]),
    'sd21': dict(  # stable-diffusion-2-1(-base): OpenCLIP-H text encoder, linear projections
        unet=dict(_SD_BLOCKS, sample_size=64, in_channels=4, out_channels=4,
                  block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True, norm_num_groups=32),
        vae=_SD_VAE, pad_token='!', prediction_type='v_prediction',
        text_encoders=[dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                            num_attention_heads=16, projection_dim=512, hidden_act='gelu')]),
    'sdxl': dict(  # stable-diffusion-xl-base-1.0
        unet=dict(_XL_BLOCKS, sample_size=128, in_channels=4, out_channels=4,
                  block_out_channels=(320, 640, 1280), layers_per_block=2,
                  transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                  attention_head_dim=(5, 10, 20), use_linear_projection=True,
                  addition_embed_type='text_time', addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816, norm_num_groups=32),
        vae=dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025), xl=True,
        text_encoders=[_CLIP_L,
                       dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, projection_dim=1280, hidden_act='gelu')]),
    'tiny': dict(
        unet=dict(_SD_BLOCKS, sample_size=16, in_channels=4, out_channels=4,
                  block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16),
        vae=TINY_VAE, text_encoders=[TINY_CLIP]),
    'tiny-sd21': dict(
        unet=dict(_SD_BLOCKS, sample_size=16, in_channels=4, out_channels=4,
                  block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                  cross_attention_dim=48, attention_head_dim=(2, 4, 8, 8),
                  use_linear_projection=True, norm_num_groups=16),
        vae=TINY_VAE, pad_token='!', prediction_type='v_prediction',
        text_encoders=[dict(TINY_CLIP, hidden_size=48, hidden_act='gelu')]),
    'tiny-sdxl': dict(
        unet=dict(_XL_BLOCKS, sample_size=16, in_channels=4, out_channels=4,
                  block_out_channels=(32, 64, 64), layers_per_block=1,
                  transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64,
                  attention_head_dim=(2, 4, 8), use_linear_projection=True,
                  addition_embed_type='text_time', addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16),
        vae=dict(TINY_VAE, scaling_factor=0.13025), xl=True,
        text_encoders=[TINY_CLIP, dict(TINY_CLIP, hidden_act='gelu')]),
}


def save_clip_tokenizer(folder: str, pad_token: str = '<|endoftext|>') -> CLIPTokenizer:
    """Write CLIP's tokenizer (vocab.json + merges.txt, 49,408 tokens) from MMSeg's BPE file.
    SD1.x pads with the end token, SD2.x and SDXL's second tokenizer with '!'."""
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
                              model_max_length=77, pad_token=pad_token)
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
    xl = spec.get('xl', False)
    torch.manual_seed(seed)
    index = {'_class_name': 'StableDiffusionXLPipeline' if xl else 'StableDiffusionPipeline',
             'scheduler': ['diffusers', 'EulerDiscreteScheduler' if xl else 'PNDMScheduler'],
             'unet': ['diffusers', 'UNet2DConditionModel'],
             'vae': ['diffusers', 'AutoencoderKL']}
    for i, text_spec in enumerate(spec['text_encoders']):
        suffix = '' if i == 0 else f'_{i + 1}'
        pad_token = spec.get('pad_token', '!' if i > 0 else '<|endoftext|>')
        tokenizer = save_clip_tokenizer(osp.join(folder, 'tokenizer' + suffix), pad_token)
        config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77,
                                bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **text_spec)
        model_class = CLIPTextModelWithProjection if xl and i == 1 else CLIPTextModel
        model_class(config).save_pretrained(osp.join(folder, 'text_encoder' + suffix))
        index['tokenizer' + suffix] = ['transformers', 'CLIPTokenizer']
        index['text_encoder' + suffix] = ['transformers', model_class.__name__]
    UNet2DConditionModel(**spec['unet']).save_pretrained(osp.join(folder, 'unet'))
    vae = AutoencoderKL(**spec['vae'])
    vae.register_to_config(scaling_factor=unit_variance_scaling(vae))
    vae.save_pretrained(osp.join(folder, 'vae'))
    prediction = dict(prediction_type=spec.get('prediction_type', 'epsilon'))
    scheduler = EulerDiscreteScheduler(**_XL_SCHEDULER, **prediction) if xl \
        else PNDMScheduler(**_SD_SCHEDULER, **prediction)
    scheduler.save_pretrained(osp.join(folder, 'scheduler'))
    with open(osp.join(folder, 'model_index.json'), 'w') as f:
        json.dump(index, f, indent=2)
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


# LoRA targets when none are given: attention projections and the ResNet convolutions.
LORA_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out.0', 'conv1', 'conv2')


def save_random_lora(path: str, sd_folder: str, rank: int = 4, seed: int = 0,
                     targets: Optional[Sequence[str]] = None, alpha: Optional[float] = None
                     ) -> str:
    """A LoRA with random, non-zero factors for the UNet at ``sd_folder`` on ``targets``
    (module name endings, e.g. the LoCon recipe's ``configs/lora/_base_.py``), in the format
    ``tools/train_lora.py`` writes (``alpha`` defaults to ``rank``): the stand-in for a
    trained adapter."""
    from peft import LoraConfig

    from ..sources.common.lora import save_lora_file
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder='unet',
                                                use_safetensors=True)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=False,
                                target_modules=list(targets or LORA_TARGETS)))
    return save_lora_file(unet, path)


# An ADM with the LSUN models' layout (attention on the three coarsest levels, resblock
# up/down, scale-shift norm, learned sigma) and 15 output blocks, small enough for the CPU.
TINY_ADM = dict(image_size=32, model_channels=32, num_res_blocks=2,
                channel_mult=(1, 1, 2, 2, 2), attention_resolutions=(8, 4, 2),
                num_head_channels=8, learn_sigma=True)


def save_random_adm(path: str, model: Optional[Dict] = None, seed: int = 0) -> str:
    """A random ADM (``model``: guided-diffusion arguments, default :data:`TINY_ADM`) saved
    as guided-diffusion saves ``lsun_horse.pt``: a ``.pt`` of its state dict."""
    from ..sources.adm import attention_levels, diffusers_config, guided_diffusion_state_dict
    model = dict(model or TINY_ADM)
    torch.manual_seed(seed)
    unet = UNet2DModel(**diffusers_config(**model))
    levels = attention_levels(model['image_size'], model['channel_mult'],
                              model['attention_resolutions'])
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    torch.save(guided_diffusion_state_dict(unet, model['num_res_blocks'], levels,
                                           model['num_head_channels']), path)
    return path


# DINOv2's layout (patch 14, class token, layer scale) at CPU size; ViT-B/14 is
# hidden_size=768, 12 layers, 12 heads.
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                   intermediate_size=64, patch_size=14, image_size=56)
DINOV2_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, patch_size=14, image_size=518)


def save_random_dinov2(folder: str, arch: Optional[Dict] = None, seed: int = 0) -> str:
    """A random ``Dinov2Model`` saved as the hub's folders are (config + safetensors)."""
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(**(arch or TINY_DINOV2))).save_pretrained(
        folder, safe_serialization=True)
    return folder
