"""Loading the frozen Stable Diffusion parts through diffusers' ``from_pretrained``.

Only safetensors are accepted (pickle files run code when loaded), and nothing is ever replaced
by random weights or a silent download: a local path that is not there is an error, and a hub id
is resolved by huggingface_hub (which honours ``HF_HUB_OFFLINE``).
"""
import os
import os.path as osp
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .latents import latent_scheduler

DEFAULT_MODEL = 'stable-diffusion-v1-5/stable-diffusion-v1-5'
_WEIGHT_COMPONENTS = ('vae', 'unet', 'text_encoder')
_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')
_GET_WEIGHTS_HINT = (
    'Get Stable Diffusion v1.5 in diffusers format with\n'
    f'  hf download {DEFAULT_MODEL} --local-dir checkpoints/sd15 '
    '--include "*.json" "*.txt" "*.safetensors" --exclude "*.fp16.*" "*non_ema*"\n'
    "and set the backbone's `sd_model='checkpoints/sd15'`.")


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


def is_local_path(pretrained: str) -> bool:
    """A hub id is ``owner/name``; anything else (or anything on disk) is a path."""
    return osp.exists(pretrained) or not _HUB_ID.match(pretrained)


def is_sdxl_model(pretrained: str) -> bool:
    """SDXL's folders (or hub repos) hold a second text encoder."""
    if osp.isdir(pretrained):
        return osp.isdir(osp.join(pretrained, 'text_encoder_2'))
    try:
        index = DiffusionPipeline.load_config(pretrained)
    except (OSError, ValueError) as err:
        raise _load_error(pretrained, 'model_index.json', err, _GET_WEIGHTS_HINT) from err
    return 'text_encoder_2' in index


# What a pipeline part's loader needs in its folder: alternatives, each a set of files that
# must all be there. transformers 5 builds a default tokenizer, silently, from a folder
# without its vocabulary: every prompt would become unknown tokens.
PART_FILES = dict(model=(('config.json', ), ), scheduler=(('scheduler_config.json', ), ),
                  clip_tokenizer=(('vocab.json', 'merges.txt'), ('tokenizer.json', )),
                  t5_tokenizer=(('spiece.model', ), ('tokenizer.json', )))


def check_parts(folder: str, parts: Dict[str, str], pipeline: str, hint: str) -> None:
    """Refuse a diffusers pipeline folder that lacks one of ``parts`` (subfolder -> kind of
    :data:`PART_FILES`) or a file its loader needs, naming the folder and the part."""
    for name, kind in parts.items():
        sub = osp.join(folder, name)
        if not osp.isdir(sub):
            raise FileNotFoundError(
                f"'{folder}' has no '{name}/' folder. A diffusers-format {pipeline} folder "
                f"holds {', '.join(n + '/' for n in parts)}.\n{hint}")
        options = PART_FILES[kind]
        if not any(all(osp.isfile(osp.join(sub, f)) for f in files) for files in options):
            wanted = ' or '.join(' + '.join(files) for files in options)
            raise FileNotFoundError(
                f"'{sub}' lacks {wanted}: its {kind.replace('_', ' ')} cannot be loaded (an "
                f'incomplete download?). Download that folder again.\n{hint}')


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
    vae = load_weights(AutoencoderKL, pretrained, 'vae', **dtype)
    unet = load_weights(UNet2DConditionModel, pretrained, 'unet', **dtype)
    names = ['text_encoder', 'text_encoder_2'] if is_sdxl_model(pretrained) \
        else ['text_encoder']
    text_encoders = [
        load_weights(CLIPTextModelWithProjection if name.endswith('_2') else CLIPTextModel,
                     pretrained, name, dtype=torch_dtype or torch.float32) for name in names]
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(pretrained,
                                                    subfolder=name.replace('text_encoder',
                                                                           'tokenizer'))
                      for name in names]
        # Only the noise schedule is needed; any SD scheduler config defines it.
        scheduler = latent_scheduler(DDPMScheduler, DDPMScheduler.load_config(
            pretrained, subfolder='scheduler'))
    except (OSError, ValueError) as err:
        raise _load_error(pretrained, 'tokenizer/ or scheduler/', err,
                          _GET_WEIGHTS_HINT) from err
    if not keep_decoder:
        drop_vae_decoder(vae)
    return StableDiffusionParts(vae, unet, text_encoders, tokenizers, scheduler, pretrained)


def load_weights(model_class, pretrained: str, subfolder: Optional[str] = None,
                 hint: str = _GET_WEIGHTS_HINT, unused_blocks: Sequence[str] = (), **kwargs):
    """``model_class.from_pretrained`` (safetensors only) that fails, naming the weights and
    ending with ``hint``, unless every tensor of the file landed in the model and all of them
    are finite. ``unused_blocks``: modules deliberately not built (``kwargs`` override the
    config to leave them out, e.g. a transformer's blocks after the last tap), whose tensors
    alone may stay in the file."""
    where = f'{pretrained}/{subfolder}' if subfolder else pretrained
    verbosity = diffusers_logging.get_verbosity()
    if unused_blocks:  # diffusers would list every tensor left out, which is intended here
        diffusers_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(
            pretrained, subfolder=subfolder, use_safetensors=True, output_loading_info=True,
            **kwargs)
    except Exception as err:  # SafetensorError, OSError, size mismatches: add the file
        raise _load_error(pretrained, where, err, hint) from err
    finally:
        diffusers_logging.set_verbosity(verbosity)
    prefixes = tuple(f'{block}.' for block in unused_blocks)
    problems = {kind: [key for key in info.get(kind) or []
                       if kind != 'unexpected_keys' or not key.startswith(prefixes)]
                for kind in ('missing_keys', 'unexpected_keys', 'mismatched_keys')}
    if any(problems.values()):
        summary = '; '.join(f'{len(keys)} {kind.replace("_", " ")} (e.g. {keys[:3]})'
                            for kind, keys in problems.items() if keys)
        raise ValueError(
            f"'{where}' does not load completely into {model_class.__name__}: {summary}. The "
            'weights belong to another architecture or the file is incomplete; re-download '
            f'it.\n{hint}')
    check_finite(model, where)
    return model


def check_finite(model: torch.nn.Module, where: str) -> None:
    """NaN or infinite weights would train silently into `loss: nan`: refuse them."""
    bad = [name for name, tensor in (*model.named_parameters(), *model.named_buffers())
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"'{where}' holds non-finite (NaN or infinite) weights in "
                         f'{len(bad)} tensor(s), e.g. {bad[:3]}. The file is corrupt: '
                         'download or export it again.')


def _load_error(pretrained: str, where: str, err: Exception, hint: str) -> Exception:
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not is_local_path(pretrained) and isinstance(err, OSError):
        return OSError(
            f"'{pretrained}' is not a local folder, and could not be loaded as a Hugging Face "
            f'hub id from the hub or its local cache ({message}). Download it first (online), '
            f'or give a local folder.\n{hint}')
    return ValueError(f"Cannot load '{where}' ({type(err).__name__}: {message}). The file is "
                      'truncated, empty or not what its config describes: download it '
                      f'again.\n{hint}')


def drop_vae_decoder(vae: AutoencoderKL) -> None:
    """Features never need pixels back: free the decoder (2.5 TFLOPs, 50M params)."""
    vae.decoder = None
    vae.post_quant_conv = None
