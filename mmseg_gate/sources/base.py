"""Frozen feature sources: the small contract every frozen feature provider meets.

A source turns images into features it never trains. Everything downstream -- the backbone's
trainable half, the label-scarce and correspondence protocols, the content-shift tool --
talks to this contract only, so any source (Stable Diffusion with GATE's guidance, several
sources side by side) fits anywhere:

- ``feature_info``: one dict per feature, in the order the features come back, with timm's
  keys ``module`` (the feature's name: its key in the per-variant dicts), ``num_chs`` and
  ``reduction`` (its stride in input pixels), plus ``num_variants`` (how many of a call's
  per-variant dicts hold it);
- ``variant_names``: a short name per variant dict a call returns;
- ``to(device)``: moves the frozen weights (in the dtype the source chooses for the device)
  and returns the source;
- ``source(images, timestep=None, generator=None)``: images (N, 3, H, W) in [-1, 1] of any
  size -> one dict per variant, name -> (N, C, ceil(H / reduction), ceil(W / reduction));
  ``timestep`` (the source's own default when None) and ``generator`` (the noise: a
  ``torch.Generator`` drawn from for the whole batch, or a ``PerImageNoise``, reproducible and
  independent per image) mean what they mean for the source, ``check_timestep`` validates a
  timestep before any work.

``FeatureSource.__call__`` is the one template every source runs: it checks the images and
the timestep, moves the weights to the images' device, resizes the images by
``input_scale`` and pads them to ``size_multiple``, calls the source's ``_extract`` and crops
every feature to the input's grid. A source implements ``_extract`` (and ``to``,
``check_timestep``, ``variant_names``, ``feature_info``).

Sources are deliberately not ``nn.Module``s: a model that owns one keeps the frozen weights
out of its checkpoints, optimizer, DDP and ``init_weights``, and ``deepcopy`` (EMA) shares
them instead of copying.
"""
import math
from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.registry import Registry

from ..engine.devices import resolve_dtype

SOURCES = Registry('frozen feature source')
# The work sources count in ``counts``, reported per image by the store and the benchmark.
COUNTS = ('vae_encodes', 'noise_samples', 'controlnet_passes', 'unet_passes',
          'denoising_passes', 'transformer_passes')
Features = Dict[str, torch.Tensor]  # one variant's: feature name -> (N, C, h, w)
SourceOutput = List[Features]  # a source call's: per variant


class FeatureSource(ABC):
    """Base of the frozen feature sources (see the module docstring for the contract)."""

    feature_info: List[dict]
    input_scale: float = 1.0  # the model sees the input resized by this factor
    ensemble_size: int = 1  # noise draws averaged per image (DIFT's and DiTF's ensembles)
    # Constructor options a store header records even when a config leaves them to their
    # defaults (those whose default changed what the features are).
    recorded_defaults: Tuple[str, ...] = ()
    size_multiple: int = 1  # the model's input sides must be multiples of this

    @property
    @abstractmethod
    def variant_names(self) -> List[str]:
        """A short name per variant dict a call returns."""

    @property
    def num_variants(self) -> int:
        return len(self.variant_names)

    @abstractmethod
    def to(self, device) -> 'FeatureSource':
        """Move the frozen weights to ``device``; returns the source."""

    @abstractmethod
    def check_timestep(self, timestep: Optional[int]) -> None:
        """Raise a ValueError naming the problem if ``timestep`` means nothing here."""

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, timestep: Optional[int] = None,
                 generator=None) -> SourceOutput:
        """One dict of features per variant for ``images`` (N, 3, H, W) in [-1, 1] of any
        size: name -> (N, C, ceil(H / reduction), ceil(W / reduction)). The template of
        every source (module docstring)."""
        check_images(images)
        if isinstance(timestep, torch.Generator):
            raise TypeError('The second argument is the timestep; pass the noise generator as '
                            '`generator=` (source(images, timestep=None, generator=...)).')
        self.check_timestep(timestep)
        self.to(images.device)
        height, width = images.shape[-2:]
        pixels = pad_to_multiple(rescaled(images, self.input_scale), self.size_multiple)
        strides = {f['module']: f['reduction'] for f in self.feature_info}
        return [{name: f[..., :math.ceil(height / strides[name]),
                         :math.ceil(width / strides[name])] for name, f in variant.items()}
                for variant in self._extract(pixels, timestep, generator)]

    @abstractmethod
    def _extract(self, pixels: torch.Tensor, timestep: Optional[int],
                 generator) -> SourceOutput:
        """Features per variant of ``pixels``: the images in [-1, 1] (float32) resized by
        ``input_scale`` and padded to ``size_multiple``, on the source's device; maps at
        the padded size (the template crops them)."""

    def prune_after_last_tap(self) -> List[str]:
        """Free the frozen model's parts that run after the last tap (feature passes stop
        there) and return their names; a source calls it once when built. Frees nothing
        where a source cannot stop early."""
        return []

    def __deepcopy__(self, memo):
        return self  # frozen weights are shared, never copied

    def feature(self, name: str) -> dict:
        """The ``feature_info`` entry of ``name``."""
        for info in self.feature_info:
            if info['module'] == name:
                return info
        raise KeyError(f"No feature '{name}'; this source has "
                       f"{[f['module'] for f in self.feature_info]}.")


def check_images(images: torch.Tensor) -> None:
    """The contract's input: (N, 3, H, W) in [-1, 1]."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f'Images must be (N, 3, H, W) in [-1, 1], got shape '
                         f'{tuple(images.shape)}.')


def move_frozen(source, modules, device) -> None:
    """Move a source's frozen ``modules`` to ``device`` in the dtype its ``dtype_name``
    chooses there (:func:`resolve_dtype`), recording both on the source; a no-op when they
    are there already."""
    device = torch.device(device)
    dtype = resolve_dtype(source.dtype_name, device)
    if (device, dtype) != (source.device, source.dtype):
        for module in modules:
            module.to(device=device, dtype=dtype)
        source.device, source.dtype = device, dtype


def rescaled(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Images resized by ``scale`` (bilinear; antialiased when shrinking) for a source that
    runs at another resolution than its input: SD1.5 at 512 on the label-scarce benchmark's
    256x256 images, ADM at its 256 on a 512 input."""
    images = images.float()
    if scale == 1.0:
        return images
    size = [max(1, round(side * scale)) for side in images.shape[-2:]]
    return F.interpolate(images, size=size, mode='bilinear', align_corners=False,
                         antialias=scale < 1)


def input_stride(model_stride: float, scale: float, name: str) -> int:
    """A feature's stride in input pixels when the model sees the input scaled by
    ``scale``; it must be whole, so that features map onto input pixels."""
    stride = model_stride / scale if scale > 0 else float('nan')
    if not abs(stride - round(stride)) <= 1e-6:
        raise ValueError(f'input_scale {scale} makes the stride of {name} {stride:g} input '
                         'pixels; choose a positive scale that keeps it whole (0.5, 1, 2 ...).')
    return int(round(stride))


def check_ensemble_size(size, owner: str) -> int:
    """A noise ensemble's size: a positive integer."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f'{owner}: ensemble_size must be a positive integer (the noise draws '
                         f'averaged per image; 1: none), got {size!r}.')
    return size


def mean_over_draws(features: torch.Tensor, draws: int) -> torch.Tensor:
    """Features (N * draws, ...) of images each repeated ``draws`` times in a row, averaged
    per image: (N, ...). DIFT's and DiTF's noise ensembles."""
    if draws == 1:
        return features
    return features.unflatten(0, (-1, draws)).mean(dim=1)


def build_source(cfg) -> FeatureSource:
    """A source from its config (``type`` defaults to ``'StableDiffusionSource'``), or the
    source itself."""
    if isinstance(cfg, FeatureSource):
        return cfg
    cfg = dict(cfg)
    cfg.setdefault('type', 'StableDiffusionSource')
    return SOURCES.build(cfg)


def refuse_renamed(owner: str, given: Dict, renamed: Dict[str, str]) -> None:
    """Refuse the keyword arguments in ``given`` (a constructor's ``**renamed``): an old name
    of an argument with its new name (every source calls the weights ``model`` and what it
    reads ``taps``), anything else as Python refuses an unknown keyword."""
    for old in given:
        if old in renamed:
            raise TypeError(f'{owner}: `{old}` is now called `{renamed[old]}` (one name across '
                            f'sources); write {renamed[old]}=... in the config.')
    if given:
        raise TypeError(f'{owner}() got unexpected keyword argument(s) {sorted(given)}.')


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right by edge replication (no artificial borders in the features)."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode='replicate')
