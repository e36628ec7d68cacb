"""Loading the frozen Stable Diffusion parts through diffusers' ``from_pretrained``.

Only safetensors are accepted (pickle files run code when loaded), and nothing is ever replaced
by random weights or a silent download: a local path that is not there is an error, and a hub id
is resolved by huggingface_hub (which honours ``HF_HUB_OFFLINE``).
"""
import os
import os.path as osp
import re
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

DEFAULT_MODEL = 'stable-diffusion-v1-5/stable-diffusion-v1-5'
_WEIGHT_COMPONENTS = ('vae', 'unet', 'text_encoder')
_COMPONENTS = _WEIGHT_COMPONENTS + ('tokenizer', 'scheduler')
_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')
_GET_WEIGHTS_HINT = (
    'Get Stable Diffusion v1.5 in diffusers format with\n'
    f'  hf download {DEFAULT_MODEL} --local-dir checkpoints/sd15 '
    '--include "*.json" "*.txt" "*.safetensors" --exclude "*.fp16.*" "*non_ema*"\n'
    "and set the backbone's `sd_model='checkpoints/sd15'`.")


@dataclass
class StableDiffusionParts:
    """What GATE needs from a Stable Diffusion checkpoint (no VAE decoder)."""
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    source: str


def is_local_path(pretrained: str) -> bool:
    """A hub id is ``owner/name``; anything else (or anything on disk) is a path."""
    return osp.exists(pretrained) or not _HUB_ID.match(pretrained)


def check_local_model(folder: str) -> None:
    """Raise a clear error for a folder that is not a safetensors diffusers SD model."""
    if not osp.isdir(folder):
        raise FileNotFoundError(
            f"GATEBackbone: model folder '{folder}' does not exist.\n{_GET_WEIGHTS_HINT}")
    for name in _COMPONENTS:
        sub = osp.join(folder, name)
        if not osp.isdir(sub):
            raise FileNotFoundError(
                f"GATEBackbone: '{folder}' has no '{name}/' folder. A diffusers-format Stable "
                f"Diffusion folder holds {', '.join(n + '/' for n in _COMPONENTS)}.\n"
                f'{_GET_WEIGHTS_HINT}')
    for name in _WEIGHT_COMPONENTS:
        sub = osp.join(folder, name)
        files = os.listdir(sub)
        if not any(f.endswith('.safetensors') for f in files):
            found = [f for f in files if f.endswith(('.bin', '.ckpt', '.pt', '.pth'))]
            raise ValueError(
                f"GATEBackbone: '{sub}' has no .safetensors weights"
                + (f' (only {", ".join(sorted(found))})' if found else '')
                + '. GATE loads safetensors only, because pickle files run code when '
                'loaded. Convert once with diffusers/transformers: '
                '`Model.from_pretrained(folder).save_pretrained(folder, '
                'safe_serialization=True)`.')


def load_stable_diffusion(pretrained: str = DEFAULT_MODEL,
                          torch_dtype: Optional[torch.dtype] = None) -> StableDiffusionParts:
    """Load VAE (decoder dropped), UNet, CLIP text encoder, tokenizer and noise schedule.

    Args:
        pretrained: a local diffusers-format folder, or a hub id such as
            ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (resolved through the local
            Hugging Face cache; set ``HF_HUB_OFFLINE=1`` to forbid downloads).
        torch_dtype: dtype for the weights; None keeps float32.
    """
    local = is_local_path(pretrained)
    if local:
        check_local_model(pretrained)
    kwargs = dict(use_safetensors=True, torch_dtype=torch_dtype)
    try:
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder='vae', **kwargs)
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder='unet', **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(
            pretrained, subfolder='text_encoder', use_safetensors=True,
            dtype=torch_dtype or torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder='tokenizer')
        # Only the forward-noising formula is needed; any SD scheduler config defines it.
        scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder='scheduler')
    except (OSError, EnvironmentError) as err:
        if local:
            raise
        raise OSError(
            f"GATEBackbone: '{pretrained}' is not a local folder, and could not be loaded as a "
            f'Hugging Face hub id from the hub or its local cache ({err}). Download it first '
            f'(online), or point `sd_model` at a local folder.\n{_GET_WEIGHTS_HINT}') from err
    drop_vae_decoder(vae)
    return StableDiffusionParts(vae, unet, text_encoder, tokenizer, scheduler, pretrained)


def drop_vae_decoder(vae: AutoencoderKL) -> None:
    """Features never need pixels back: free the decoder (2.5 TFLOPs, 50M params)."""
    vae.decoder = None
    vae.post_quant_conv = None
