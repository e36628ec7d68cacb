"""Loading the frozen Stable Diffusion parts through diffusers' ``from_pretrained``.

Only safetensors are accepted (pickle files run code when loaded), and nothing is ever replaced
by random weights or a silent download: a local path that is not there is an error, and a hub id
is resolved by huggingface_hub (which honours ``HF_HUB_OFFLINE``).
"""
import os
import os.path as osp
from dataclasses import dataclass
from typing import List, Optional

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..common.latents import latent_scheduler
from ..common.loading import check_parts, drop_vae_decoder, is_local_path, load_error, load_weights

DEFAULT_MODEL = 'stable-diffusion-v1-5/stable-diffusion-v1-5'
_WEIGHT_COMPONENTS = ('vae', 'unet', 'text_encoder')
_GET_WEIGHTS_HINT = (
    'Get Stable Diffusion v1.5 in diffusers format with\n'
    f'  hf download {DEFAULT_MODEL} --local-dir checkpoints/sd15 '
    '--include "*.json" "*.txt" "*.safetensors" --exclude "*.fp16.*" "*non_ema*"\n'
    "and set the backbone's `model='checkpoints/sd15'`.")


@dataclass
class StableDiffusionParts:
    """What GATE needs from a Stable Diffusion checkpoint (no VAE decoder unless asked). SD1.x/2.x have
    one text encoder and tokenizer, SDXL two (the second with a pooled projection)."""
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoders: List[CLIPTextModel]
    tokenizers: List[CLIPTokenizer]
    scheduler: DDPMScheduler
    source: str

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2


def is_sdxl_model(pretrained: str) -> bool:
    """SDXL's folders (or hub repos) hold a second text encoder."""
    if osp.isdir(pretrained):
        return osp.isdir(osp.join(pretrained, 'text_encoder_2'))
    try:
        index = DiffusionPipeline.load_config(pretrained)
    except (OSError, ValueError) as err:
        raise load_error(pretrained, 'model_index.json', err, _GET_WEIGHTS_HINT) from err
    return 'text_encoder_2' in index


def check_local_model(folder: str) -> None:
    """Raise a clear error for a folder that is not a safetensors diffusers SD model."""
    if not osp.isdir(folder):
        raise FileNotFoundError(
            f"Model folder '{folder}' does not exist.\n{_GET_WEIGHTS_HINT}")
    xl = is_sdxl_model(folder)
    parts = dict(vae='model', unet='model', text_encoder='model', tokenizer='clip_tokenizer',
                 scheduler='scheduler')
    if xl:
        parts.update(text_encoder_2='model', tokenizer_2='clip_tokenizer')
    check_parts(folder, parts, 'Stable Diffusion', _GET_WEIGHTS_HINT)
    for name in _WEIGHT_COMPONENTS + (('text_encoder_2', ) if xl else ()):
        sub = osp.join(folder, name)
        files = os.listdir(sub)
        variants = [f for f in files if is_variant_weights(f)]
        if variants and not any(f.endswith('.safetensors') and not is_variant_weights(f)
                                for f in files):
            raise ValueError(
                f"'{sub}' holds only variant weights ({', '.join(sorted(variants))}"
                '), not the full-precision safetensors file diffusers loads by default. '
                "Download the full files too (drop `--exclude \"*.fp16.*\"`), or convert once: "
                "`Model.from_pretrained(folder, variant='fp16').save_pretrained(folder)`.")
        if not any(f.endswith('.safetensors') for f in files):
            found = [f for f in files if f.endswith(('.bin', '.ckpt', '.pt', '.pth'))]
            raise ValueError(
                f"'{sub}' has no .safetensors weights"
                + (f' (only {", ".join(sorted(found))})' if found else '')
                + '. GATE loads safetensors only, because pickle files run code when '
                'loaded. Convert once with diffusers/transformers: '
                '`Model.from_pretrained(folder).save_pretrained(folder, '
                'safe_serialization=True)`.')


def is_variant_weights(name: str) -> bool:
    """``diffusion_pytorch_model.fp16.safetensors`` and the like (a dot in the stem)."""
    return name.endswith('.safetensors') and '.' in name[:-len('.safetensors')]


def load_stable_diffusion(pretrained: str = DEFAULT_MODEL,
                          torch_dtype: Optional[torch.dtype] = None,
                          keep_decoder: bool = False) -> StableDiffusionParts:
    """Load VAE (decoder dropped unless ``keep_decoder``), UNet, CLIP text encoder(s), tokenizer(s) and noise
    schedule of an SD1.x, SD2.x or SDXL model.

    Every weight file must load completely (no key missing, left over or of another shape)
    and hold finite values; anything else is an error naming the file.

    Args:
        pretrained: a local diffusers-format folder, or a hub id such as
            ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (resolved through the local
            Hugging Face cache; set ``HF_HUB_OFFLINE=1`` to forbid downloads).
        torch_dtype: dtype for the weights; None keeps float32.
        keep_decoder: keep the VAE decoder (only pictures need it, never features).
    """
    local = is_local_path(pretrained)
    if local:
        check_local_model(pretrained)
    dtype = dict(torch_dtype=torch_dtype)
    vae = load_weights(AutoencoderKL, pretrained, 'vae', _GET_WEIGHTS_HINT, **dtype)
    unet = load_weights(UNet2DConditionModel, pretrained, 'unet', _GET_WEIGHTS_HINT, **dtype)
    names = ['text_encoder', 'text_encoder_2'] if is_sdxl_model(pretrained) \
        else ['text_encoder']
    text_encoders = [
        load_weights(CLIPTextModelWithProjection if name.endswith('_2') else CLIPTextModel,
                     pretrained, name, _GET_WEIGHTS_HINT, dtype=torch_dtype or torch.float32)
        for name in names]
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(pretrained,
                                                    subfolder=name.replace('text_encoder',
                                                                           'tokenizer'))
                      for name in names]
        # Only the noise schedule is needed; any SD scheduler config defines it.
        scheduler = latent_scheduler(DDPMScheduler, DDPMScheduler.load_config(
            pretrained, subfolder='scheduler'))
    except (OSError, ValueError) as err:
        raise load_error(pretrained, 'tokenizer/ or scheduler/', err,
                          _GET_WEIGHTS_HINT) from err
    if not keep_decoder:
        drop_vae_decoder(vae)
    return StableDiffusionParts(vae, unet, text_encoders, tokenizers, scheduler, pretrained)
