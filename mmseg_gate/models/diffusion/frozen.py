"""The frozen half of a GATE backbone: image -> VAE latent -> noised latent -> UNet taps.

It is deliberately *not* an ``nn.Module`` child of the backbone, so MMEngine never sees the
diffusion weights: they are not in checkpoints (a checkpoint reload rebuilds them from their
source), not given to the optimizer or DDP, not reset by ``init_weights``, not switched to train
mode, and not copied by ``deepcopy`` (EMA hooks): frozen weights can be shared.
"""
from collections import Counter
from typing import List, Optional, Sequence, Tuple

import torch

from .loading import StableDiffusionParts
from .prompts import encode_prompt
from .unet_taps import UNetTaps

_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on accelerators and float32 on the CPU (CPU half is slow)."""
    if name == 'auto':
        return torch.float32 if device.type == 'cpu' else torch.float16
    if name not in _DTYPES:
        raise ValueError(f"GATEBackbone: frozen_dtype must be 'auto' or one of "
                         f'{sorted(_DTYPES)}, got {name!r}.')
    return _DTYPES[name]


class FrozenStableDiffusion:
    """Frozen VAE encoder + UNet with a cached prompt embedding; runs without gradients.

    Args:
        parts: loaded Stable Diffusion components; the text encoder is used once here, to
            encode ``prompt``, and then dropped.
        taps: UNet submodule names whose activations are returned.
        timestep: diffusion timestep of the noise added to the latent (of 1000).
        prompt: text for the UNet's cross-attention.
        dtype: 'auto', 'float32', 'float16' or 'bfloat16' for the frozen weights.
    """

    def __init__(self, parts: StableDiffusionParts, taps: Sequence[str], timestep: int = 50,
                 prompt: str = '', dtype: str = 'auto'):
        num_steps = parts.scheduler.config.num_train_timesteps
        if not 0 <= timestep < num_steps:
            raise ValueError(f'GATEBackbone: timestep must be in [0, {num_steps}), '
                             f'got {timestep}.')
        resolve_dtype(dtype, torch.device('cpu'))  # validate early
        self.vae, self.unet, self.scheduler = parts.vae, parts.unet, parts.scheduler
        for module in (self.vae, self.unet):
            module.requires_grad_(False).eval()
        self.source = parts.source
        self.taps = UNetTaps(self.unet, taps)
        self.timestep = timestep
        self.dtype_name = dtype
        self.prompt_embeds = encode_prompt(parts.text_encoder, parts.tokenizer, prompt)
        self.device, self.dtype = torch.device('cpu'), self.vae.dtype
        self.counts: Counter = Counter()

    def __deepcopy__(self, memo):
        return self

    def to(self, device: torch.device) -> 'FrozenStableDiffusion':
        """Move to ``device`` in the dtype chosen for it; a no-op when already there."""
        dtype = resolve_dtype(self.dtype_name, device)
        if (device, dtype) != (self.device, self.dtype):
            for module in (self.vae, self.unet):
                module.to(device=device, dtype=dtype)
            self.prompt_embeds = self.prompt_embeds.to(device=device, dtype=dtype)
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
    def unet_features(self, noisy: torch.Tensor) -> List[torch.Tensor]:
        """One truncated UNet pass; returns the tapped activations."""
        self.counts['unet_passes'] += noisy.shape[0]
        context = self.prompt_embeds.expand(noisy.shape[0], -1, -1)
        return self.taps(noisy, self.timestep, context)

    def __call__(self, pixels: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """Tapped UNet activations for images in [-1, 1] (sides a multiple of 64)."""
        self.to(pixels.device)
        return self.unet_features(self.add_noise(self.encode(pixels), generator))

    @torch.no_grad()
    def probe_shapes(self, size: int = 64) -> List[Tuple[int, int]]:
        """(channels, stride) of each tap, from one small pass on a ``size``-pixel latent."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        latent = torch.zeros(1, self.unet.config.in_channels, size // factor, size // factor,
                             device=self.device, dtype=self.dtype)
        feats = self.taps(latent, self.timestep, self.prompt_embeds)
        return [(f.shape[1], size // f.shape[-1]) for f in feats]
