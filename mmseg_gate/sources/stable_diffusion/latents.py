"""Image -> scaled VAE latent -> noised latent: the formulas every GATE path uses, and the
schedulers that step latents."""
from typing import Optional

import torch


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's mode for images in [-1, 1], shifted and scaled as the UNet expects
    (``(z - shift_factor) * scaling_factor``; SD's shift is 0, SD3/FLUX VAEs have one)."""
    latent = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, 'shift_factor', None) or 0.0
    return (latent - shift) * vae.config.scaling_factor


def draw_noise(shape, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Standard normal noise drawn on the CPU in float32, so one seed gives the same noise
    on every device and dtype."""
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@torch.no_grad()
def noised(scheduler, latents: torch.Tensor, timestep: int,
           noise: torch.Tensor) -> torch.Tensor:
    """Forward diffusion of ``latents`` to ``timestep`` with ``noise``."""
    timesteps = torch.full((latents.shape[0], ), timestep, dtype=torch.long)
    return scheduler.add_noise(latents, noise.to(latents), timesteps.to(latents.device))


def add_noise(scheduler, latents: torch.Tensor, timestep: int,
              generator: Optional[torch.Generator]) -> torch.Tensor:
    """Forward diffusion of ``latents`` to ``timestep`` with noise drawn from ``generator``."""
    return noised(scheduler, latents, timestep, draw_noise(latents.shape, generator))


def latent_scheduler(scheduler_class, config):
    """``scheduler_class`` on ``config``'s noise schedule that never clips or thresholds the
    predicted sample. Both are pixel-space options, and DDPM/DDIM default to
    ``clip_sample=True``: a config without the key (tiny test models, some community
    checkpoints) would clamp latents, which are not bounded to [-1, 1], at every step."""
    return scheduler_class.from_config(config, clip_sample=False, thresholding=False)
