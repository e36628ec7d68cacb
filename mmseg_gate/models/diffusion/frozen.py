"""The frozen half of a GATE backbone: image -> VAE latent -> noised latent -> guided UNet taps.

Work is shared across GATE's variants: one VAE encode and one noise sample per image, prompt
embeddings encoded once at build time, one condition and one ControlNet pass per (ControlNet,
prompt) whatever the number of variants using it, and the variants run as one UNet batch with
a LoRA adapter chosen per sample (peft mixed-adapter batches), each pass stopping after the
last tapped block.

It is deliberately *not* an ``nn.Module`` child of the backbone, so MMEngine never sees the
diffusion weights: they are not in checkpoints (a checkpoint reload rebuilds them from their
source), not given to the optimizer or DDP, not reset by ``init_weights``, not switched to train
mode, and not copied by ``deepcopy`` (EMA hooks): frozen weights can be shared.
"""
import numbers
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .conditions import ConditionDetector
from .loading import StableDiffusionParts
from .lora import BASE, adapters_per_sample, load_lora_adapters
from .prompts import encode_prompt
from .unet_taps import UNetTaps
from .variants import Variant

_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
Residuals = Tuple[List[torch.Tensor], torch.Tensor]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on accelerators and float32 on the CPU (CPU half is slow)."""
    if name == 'auto':
        return torch.float32 if device.type == 'cpu' else torch.float16
    if name not in _DTYPES:
        raise ValueError(f"GATEBackbone: frozen_dtype must be 'auto' or one of "
                         f'{sorted(_DTYPES)}, got {name!r}.')
    return _DTYPES[name]


class FrozenStableDiffusion:
    """Frozen VAE encoder, UNet (+ LoRA adapters) and ControlNets; runs without gradients.

    Args:
        parts: loaded Stable Diffusion components; the text encoder is used here to encode the
            variants' prompts and then dropped.
        taps: UNet submodule names whose activations are returned.
        timestep: diffusion timestep of the noise added to the latent (of 1000).
        variants: the guided variants; default one prompt-only variant with an empty prompt.
        controlnets: name -> (ControlNet, condition detector).
        loras: name -> LoRA safetensors file.
        dtype: 'auto', 'float32', 'float16' or 'bfloat16' for the frozen weights.
        batch_variants: run all variants of an image as one UNet batch (True) or one after
            another (False: less peak memory, same features).
    """

    def __init__(self, parts: StableDiffusionParts, taps: Sequence[str], timestep: int = 50,
                 variants: Optional[Sequence[Variant]] = None,
                 controlnets: Optional[Dict[str, Tuple[object, ConditionDetector]]] = None,
                 loras: Optional[Dict[str, str]] = None, dtype: str = 'auto',
                 batch_variants: bool = True):
        num_steps = parts.scheduler.config.num_train_timesteps
        if isinstance(timestep, bool) or not isinstance(timestep, numbers.Integral):
            raise ValueError(f'GATEBackbone: timestep must be an integer in [0, {num_steps}) '
                             f'(a step of the noise schedule), got {timestep!r}.')
        if not 0 <= timestep < num_steps:
            raise ValueError(f'GATEBackbone: timestep must be in [0, {num_steps}), '
                             f'got {timestep}.')
        resolve_dtype(dtype, torch.device('cpu'))  # validate early
        self.vae, self.unet, self.scheduler = parts.vae, parts.unet, parts.scheduler
        self.source = parts.source
        self.variants = list(variants or [Variant('')])
        self.controlnets = {n: cn for n, (cn, _) in (controlnets or {}).items()}
        self.detectors = {n: det for n, (_, det) in (controlnets or {}).items()}
        load_lora_adapters(self.unet, {v.adapter: loras[v.lora] for v in self.variants
                                       if v.lora is not None},
                           {v.adapter: v.lora_scale for v in self.variants})
        for module in self._modules():
            module.requires_grad_(False).eval()
        self.taps = UNetTaps(self.unet, taps)
        self.timestep = int(timestep)
        self.dtype_name = dtype
        self.batch_variants = batch_variants
        self.prompt_embeds = {p: encode_prompt(parts.text_encoder, parts.tokenizer, p)
                              for p in dict.fromkeys(v.prompt for v in self.variants)}
        self.use_adapters = any(v.lora is not None for v in self.variants)
        self.device, self.dtype = torch.device('cpu'), self.vae.dtype
        self.counts: Counter = Counter()

    def __deepcopy__(self, memo):
        return self

    def _modules(self):
        return [self.vae, self.unet, *self.controlnets.values()]

    def to(self, device: torch.device) -> 'FrozenStableDiffusion':
        """Move to ``device`` in the dtype chosen for it; a no-op when already there."""
        dtype = resolve_dtype(self.dtype_name, device)
        if (device, dtype) != (self.device, self.dtype):
            for module in self._modules():
                module.to(device=device, dtype=dtype)
            self.prompt_embeds = {p: e.to(device=device, dtype=dtype)
                                  for p, e in self.prompt_embeds.items()}
            self.device, self.dtype = device, dtype
        return self

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latent (distribution mode) of images in [-1, 1]."""
        self.counts['vae_encodes'] += pixels.shape[0]
        latent = self.vae.encode(pixels.to(self.dtype)).latent_dist.mode()
        shift = getattr(self.vae.config, 'shift_factor', None) or 0.0
        return (latent - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def add_noise(self, latents: torch.Tensor,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
        """Forward diffusion to ``timestep``; noise is drawn on the CPU so seeds give the same
        noise on every device."""
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        timesteps = torch.full((latents.shape[0],), self.timestep, dtype=torch.long)
        return self.scheduler.add_noise(latents, noise.to(latents), timesteps.to(latents.device))

    @torch.no_grad()
    def controlnet_residuals(self, pixels: torch.Tensor,
                             noisy: torch.Tensor) -> Dict[Tuple[str, str], Residuals]:
        """Unscaled residuals of each (ControlNet, prompt) some variant uses, each computed
        once: variants differ only in how much of them they add."""
        needed = dict.fromkeys((name, v.prompt) for v in self.variants
                               for name, _ in v.controlnets)
        conditions = {name: self.detectors[name](pixels).to(self.dtype)
                      for name in dict.fromkeys(name for name, _ in needed)}
        residuals = {}
        for name, prompt in needed:
            self.counts['controlnet_passes'] += noisy.shape[0]
            context = self.prompt_embeds[prompt].expand(noisy.shape[0], -1, -1)
            down, mid = self.controlnets[name](noisy, self.timestep, context,
                                               controlnet_cond=conditions[name],
                                               conditioning_scale=1.0, return_dict=False)
            residuals[name, prompt] = (list(down), mid)
        return residuals

    def _variant_residuals(self, variant: Variant, residuals, like: Residuals) -> Residuals:
        """The variant's scaled sum of ControlNet residuals (zeros without ControlNet)."""
        down = [torch.zeros_like(r) for r in like[0]]
        mid = torch.zeros_like(like[1])
        for name, scale in variant.controlnets:
            res_down, res_mid = residuals[name, variant.prompt]
            down = [d + scale * r for d, r in zip(down, res_down)]
            mid = mid + scale * res_mid
        return down, mid

    @torch.no_grad()
    def unet_features(self, noisy: torch.Tensor,
                      residuals: Optional[Dict] = None) -> List[List[torch.Tensor]]:
        """Tapped activations per variant, the variants batched by prompt length."""
        residuals = residuals or {}
        feats: List[Optional[List[torch.Tensor]]] = [None] * len(self.variants)
        for group in self._batches():
            out = self._run_batch([self.variants[i] for i in group], noisy, residuals)
            for i, variant_feats in zip(group, out):
                feats[i] = variant_feats
        return feats

    def _batches(self) -> List[List[int]]:
        if not self.batch_variants:
            return [[i] for i in range(len(self.variants))]
        by_length = defaultdict(list)
        for i, variant in enumerate(self.variants):
            by_length[self.prompt_embeds[variant.prompt].shape[1]].append(i)
        return list(by_length.values())

    def _run_batch(self, variants: List[Variant], noisy: torch.Tensor,
                   residuals: Dict) -> List[List[torch.Tensor]]:
        batch = noisy.shape[0]
        self.counts['unet_passes'] += batch * len(variants)
        sample = noisy.repeat(len(variants), 1, 1, 1)
        context = torch.cat([self.prompt_embeds[v.prompt].expand(batch, -1, -1)
                             for v in variants])
        down = mid = None
        if residuals and any(v.controlnets for v in variants):
            like = next(iter(residuals.values()))
            parts = [self._variant_residuals(v, residuals, like) for v in variants]
            down = [torch.cat(level) for level in zip(*(p[0] for p in parts))]
            mid = torch.cat([p[1] for p in parts])
        names = [v.adapter or BASE for v in variants for _ in range(batch)]
        if self.use_adapters:
            with adapters_per_sample(self.unet, names):
                taps = self.taps(sample, self.timestep, context, down, mid)
        else:
            taps = self.taps(sample, self.timestep, context, down, mid)
        return [[t[i * batch:(i + 1) * batch] for t in taps] for i in range(len(variants))]

    def __call__(self, pixels: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> List[List[torch.Tensor]]:
        """Tapped UNet activations per variant for images in [-1, 1] (sides a multiple of 64)."""
        self.to(pixels.device)
        noisy = self.add_noise(self.encode(pixels), generator)
        return self.unet_features(noisy, self.controlnet_residuals(pixels, noisy))

    @torch.no_grad()
    def probe_shapes(self, size: int = 64) -> List[Tuple[int, int]]:
        """(channels, stride) of each tap, from one small pass on a ``size``-pixel latent."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        latent = torch.zeros(1, self.unet.config.in_channels, size // factor, size // factor,
                             device=self.device, dtype=self.dtype)
        context = next(iter(self.prompt_embeds.values()))
        feats = self.taps(latent, self.timestep, context)
        return [(f.shape[1], size // f.shape[-1]) for f in feats]
