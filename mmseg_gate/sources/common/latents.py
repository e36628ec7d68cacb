"""Image -> scaled VAE latent -> noised latent: the formulas every GATE path uses, the noise
they draw, and the schedulers that step latents."""
import hashlib
from typing import Optional, Sequence, Union

import torch

from ...datasets.images import pixel_key


class PerImageNoise:
    """Reproducible noise that is independent per image: image ``i``'s noise is drawn from a
    CPU generator seeded with the SHA-256 of (``seed``, ``keys[i]``), so it is the same for the
    same image in any run, process, batch or position, and differs between images (one
    generator for a whole batch would give every image of a one-image batch the same noise
    field, which biases matching between images towards equal positions).

    A source takes it where it takes a ``generator``. ``seed``: a variant with a
    ``noise_seed`` of its own uses that instead. :meth:`for_images` keys images by their 8-bit
    pixels (:func:`pixel_key`): the backbone in eval mode, the feature store and the
    correspondence protocol draw the same noise for the same image."""

    def __init__(self, seed: int, keys: Sequence[str]):
        self.seed, self.keys = int(seed), list(keys)

    @classmethod
    def for_images(cls, images: torch.Tensor, seed: int) -> 'PerImageNoise':
        """Noise keyed by each image's pixels; ``images`` (N, 3, H, W) in [-1, 1]."""
        return cls(seed, [pixel_key(image) for image in images])

    def part(self, name: str) -> 'PerImageNoise':
        """The noise of one of several sources side by side: independent of the others'."""
        return PerImageNoise(self.seed, [f'{key}/{name}' for key in self.keys])

    def repeated(self, draws: int) -> 'PerImageNoise':
        """The noise of ``draws`` draws per image (a noise ensemble, images repeated
        ``draws`` times in a row): draw 0 is the image's usual noise, the others independent
        of it."""
        return PerImageNoise(self.seed, [key if d == 0 else f'{key}#draw{d}'
                                         for key in self.keys for d in range(draws)])

    def draw(self, shape, seed: Optional[int] = None,
             stream: Optional[int] = None) -> torch.Tensor:
        """Standard normal (N, ...) noise in float32, image by image (``seed``: a variant's
        own instead of this one's; ``stream``: another independent draw of the same image,
        e.g. one per variant)."""
        if shape[0] != len(self.keys):
            raise ValueError(f'PerImageNoise has {len(self.keys)} image keys for a batch of '
                             f'{shape[0]}.')
        seed = self.seed if seed is None else int(seed)
        suffix = '' if stream is None else f':{stream}'
        return torch.cat([torch.randn((1, *shape[1:]), dtype=torch.float32,
                                      generator=torch.Generator().manual_seed(
                                          _derived_seed(seed, key + suffix)))
                          for key in self.keys])


def _derived_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f'{seed}:{key}'.encode()).digest()
    return int.from_bytes(digest[:8], 'big')


Noise = Union[torch.Generator, PerImageNoise]


def ensemble_noise(generator: Optional[Noise], draws: int) -> Optional[Noise]:
    """The noise of a batch whose images are each repeated ``draws`` times in a row: a
    ``PerImageNoise`` keyed per draw; a generator simply draws on."""
    if draws > 1 and isinstance(generator, PerImageNoise):
        return generator.repeated(draws)
    return generator


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's mode for images in [-1, 1], shifted and scaled as the UNet expects
    (``(z - shift_factor) * scaling_factor``; SD's shift is 0, SD3/FLUX VAEs have one)."""
    latent = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, 'shift_factor', None) or 0.0
    return (latent - shift) * vae.config.scaling_factor


def draw_noise(shape, generator: Optional[Noise], seed: Optional[int] = None,
               stream: Optional[int] = None) -> torch.Tensor:
    """Standard normal noise drawn on the CPU in float32, so one seed gives the same noise on
    every device and dtype: from ``generator`` (a stream for the whole batch, or
    :class:`PerImageNoise`), or for ``seed`` (a variant's own noise seed). ``stream``: an
    independent draw (a variant's own): with a ``PerImageNoise`` part of its key; for a
    ``seed``, mixed into it; a generator stream simply draws on."""
    if isinstance(generator, PerImageNoise):
        return generator.draw(shape, seed, stream)
    if seed is not None:
        generator = torch.Generator().manual_seed(
            seed if stream is None else _derived_seed(seed, f'stream {stream}'))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@torch.no_grad()
def noised(scheduler, latents: torch.Tensor, timestep: int,
           noise: torch.Tensor) -> torch.Tensor:
    """Forward diffusion of ``latents`` to ``timestep`` with ``noise``."""
    timesteps = torch.full((latents.shape[0], ), timestep, dtype=torch.long)
    return scheduler.add_noise(latents, noise.to(latents), timesteps.to(latents.device))


def add_noise(scheduler, latents: torch.Tensor, timestep: int,
              generator: Optional[Noise]) -> torch.Tensor:
    """Forward diffusion of ``latents`` to ``timestep`` with noise drawn from ``generator``."""
    return noised(scheduler, latents, timestep, draw_noise(latents.shape, generator))


def latent_scheduler(scheduler_class, config):
    """``scheduler_class`` on ``config``'s noise schedule that never clips or thresholds the
    predicted sample. Both are pixel-space options, and DDPM/DDIM default to
    ``clip_sample=True``: a config without the key (tiny test models, some community
    checkpoints) would clamp latents, which are not bounded to [-1, 1], at every step."""
    return scheduler_class.from_config(config, clip_sample=False, thresholding=False)
