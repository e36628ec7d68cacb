"""The straightforward way to compute GATE's features, as the authors' code runs them.

Every variant is a full model copy -- its LoRA merged into its own UNet, its own ControlNets --
and runs on its own: its own VAE encode, its own ControlNet passes, the whole UNet up to
``conv_out`` with hooks on the taps. ``tools/benchmark.py --naive`` measures it against
``StableDiffusionSource``, and a test checks that the shared computation changes nothing. It
takes the same source config, read through ``StableDiffusionSource``'s own signature (the one
declaration of the arguments and their defaults), and builds everything itself; it shares only
the formulas (latent encoding, noise, prompt encoding, conditions).
"""
import copy
import inspect
import math
from collections import Counter
from dataclasses import replace
from typing import Dict, List

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils.peft_utils import set_weights_and_activate_adapters

from ..engine.devices import resolve_dtype
from ..sources.base import pad_to_multiple
from ..sources.common.conditions import build_detectors
from ..sources.common.latents import add_noise, encode_latents
from ..sources.common.lora import (TEXT_ENCODERS, load_lora_adapters, load_text_encoder_lora,
                                   read_lora_file)
from ..sources.common.taps import as_spatial, first_tensor
from ..sources.stable_diffusion.controlnets import load_controlnet
from ..sources.stable_diffusion.loading import load_stable_diffusion
from ..sources.stable_diffusion.prompts import encode_prompt
from ..sources.stable_diffusion.source import StableDiffusionSource, class_names_text
from ..sources.stable_diffusion.variants import parse_variants


class NaiveGATE:
    """GATE's features the authors' way; the SD1.x/SD2.x segmentation recipe (taps,
    prompts, ControlNets, LoRAs; no guided denoising, attention maps or SDXL).

    Args:
        device: where the copies run.
        source_cfg: a ``StableDiffusionSource`` config (``type`` may be left out); settings
            that only change how the work is shared (``batch_variants``, ``lora_mode``) are
            read and ignored.
    """

    def __init__(self, device: torch.device, source_cfg: dict):
        cfg = {k: v for k, v in dict(source_cfg).items() if k != 'type'}
        bound = inspect.signature(StableDiffusionSource).bind(**cfg)
        bound.apply_defaults()
        a = bound.arguments
        if a['denoising_from'] is not None or a['attention_maps']:
            raise ValueError('NaiveGATE reproduces the segmentation recipe only (no '
                             'denoising_from, no attention_maps).')
        model, taps = a['model'], a['taps']
        controlnets, loras = dict(a['controlnets'] or {}), dict(a['loras'] or {})
        self.variants = parse_variants(a['variants'], a['prompt'], list(controlnets),
                                       list(loras), a['timestep'])
        if any(v.denoising_from is not None for v in self.variants):
            raise ValueError('NaiveGATE reproduces the segmentation recipe only (no '
                             'denoising_from).')
        if a['append_class_names']:
            names = class_names_text(a['class_names'])
            self.variants = [replace(v, prompt=f'{v.prompt.rstrip()} {names}'.strip())
                             for v in self.variants]
        self.dtype = dtype = resolve_dtype(a['frozen_dtype'], device)
        parts = load_stable_diffusion(model)
        if parts.is_sdxl:
            raise ValueError('NaiveGATE covers SD1.x/SD2.x.')
        self.prompt_embeds = [self._encode(parts, v, loras).to(device, dtype)
                              for v in self.variants]
        self.scheduler, self.taps = parts.scheduler, list(taps)
        self.detectors = build_detectors(controlnets)
        self.size_multiple = 2**(len(parts.vae.config.block_out_channels) - 1) * \
            2**parts.unet.num_upsamplers
        del parts
        self.copies = []
        for variant in self.variants:
            vae = AutoencoderKL.from_pretrained(model, subfolder='vae', use_safetensors=True)
            unet = UNet2DConditionModel.from_pretrained(model, subfolder='unet',
                                                        use_safetensors=True)
            if variant.lora is not None:
                load_lora_adapters(unet, {variant.adapter: loras[variant.lora]},
                                   {variant.adapter: variant.lora_scale})
                unet.fuse_lora(adapter_names=[variant.adapter])
                unet.unload_lora()
            nets = {name: load_controlnet(controlnets[name]['model'], unet).to(device, dtype)
                    for name, _ in variant.controlnets}
            self.copies.append((vae.to(device, dtype).eval(), unet.to(device, dtype).eval(),
                                nets))
        self.counts: Counter = Counter()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor,
                 generator_seed: int = 0) -> List[Dict[str, torch.Tensor]]:
        """Features per variant (tap -> map) for images in [-1, 1]; the noise of each
        variant's copy is drawn from ``generator_seed``, as the extractor draws it once."""
        height, width = images.shape[-2:]
        pixels = pad_to_multiple(images.float(), self.size_multiple).to(self.dtype)
        feats = [self._variant(v, embed, *models, pixels, generator_seed)
                 for v, embed, models in zip(self.variants, self.prompt_embeds, self.copies)]
        strides = {tap: pixels.shape[-1] // f.shape[-1] for tap, f in feats[0].items()}
        self.feature_info = [dict(module=tap, num_chs=f.shape[1], reduction=strides[tap],
                                  num_variants=len(self.variants))
                             for tap, f in feats[0].items()]
        return [{tap: f[..., :math.ceil(height / strides[tap]), :math.ceil(width / strides[tap])]
                 for tap, f in variant.items()} for variant in feats]

    @staticmethod
    def _encode(parts, variant, loras: dict):
        """The variant's prompt through its own text encoder copy (with the LoRA's
        text-encoder part, if its file has one)."""
        encoders = parts.text_encoders
        if variant.lora is not None:
            path = loras[variant.lora]
            lora = read_lora_file(path, parts.unet.config)
            if lora.text_encoders:
                encoders = [copy.deepcopy(e) for e in encoders]
                for prefix, encoder in zip(TEXT_ENCODERS, encoders):
                    if prefix in lora.text_encoders:
                        load_text_encoder_lora(encoder, prefix, 'x', lora, path)
                        set_weights_and_activate_adapters(encoder, ['x'], [variant.lora_scale])
        return encode_prompt(encoders, parts.tokenizers, variant.prompt)

    def _variant(self, variant, embed, vae, unet, controlnets, pixels, seed):
        self.counts['vae_encodes'] += len(pixels)
        seed = seed if variant.noise_seed is None else variant.noise_seed
        noisy = add_noise(self.scheduler, encode_latents(vae, pixels), variant.timestep,
                          torch.Generator().manual_seed(seed))
        context = embed.hidden.expand(len(noisy), -1, -1)
        down = mid = None
        for name, scale in variant.controlnets:
            self.counts['controlnet_passes'] += len(pixels)
            condition = self.detectors[name](pixels).to(self.dtype)
            d, m = controlnets[name](noisy, variant.timestep, context, controlnet_cond=condition,
                                     conditioning_scale=scale, return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        captured, modules = {}, dict(unet.named_modules())
        handles = [modules[tap].register_forward_hook(
            lambda _m, _i, out, tap=tap: captured.__setitem__(
                tap, as_spatial(first_tensor(out), tuple(noisy.shape[-2:]), tap)))
            for tap in self.taps]
        self.counts['unet_passes'] += len(pixels)
        try:
            unet(noisy, variant.timestep, context, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid)
        finally:
            for handle in handles:
                handle.remove()
        return {tap: captured[tap] for tap in self.taps}

