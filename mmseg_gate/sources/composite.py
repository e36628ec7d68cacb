"""Several frozen sources side by side: one source to everything downstream.

The label-scarce benchmark concatenates Stable Diffusion's features with ADM's, and the
strongest correspondence systems fuse Stable Diffusion with DINOv2. A ``CompositeSource``
combines any sources in one of three ways:

- ``'separate'`` (kept apart): every source's variants in turn, each feature renamed
  ``'<source>.<feature>'`` and held only by its own source's variants; the backbone's fusion
  then amalgamates each source's variants on their own and outputs every source's levels;
- ``'concat'`` (by concatenation per level): level i of each source, resized (bilinear) to
  the first source's grid and concatenated along channels; the sources need as many levels
  and as many variants;
- ``'variants'`` (by amalgamation): all sources' variants pooled into one set per level,
  resized to the first source's grid, so the amalgamation weighs them against each other;
  level i needs the same channels in every source.
"""
from collections import Counter
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .base import SOURCES, FeatureSource, Features, build_source
from .common.latents import Noise, PerImageNoise

MODES = ('separate', 'concat', 'variants')


@SOURCES.register_module()
class CompositeSource(FeatureSource):
    """Several sources as one.

    Args:
        sources (dict): name -> a source or its config (``dict(type=..., ...)``); a None
            entry is left out (``--cfg-options model.backbone.source.sources.adm=None``).
        mode (str): 'separate', 'concat' or 'variants' (see the module docstring).
            Default: 'separate'.
    """

    def __init__(self, sources: Dict[str, dict], mode: str = 'separate'):
        if mode not in MODES:
            raise ValueError(f'CompositeSource mode must be one of {MODES}, got {mode!r}.')
        if not sources:
            raise ValueError('CompositeSource needs at least one source.')
        self.mode = mode
        self.sources = {name: build_source(cfg) for name, cfg in sources.items()
                        if cfg is not None}
        if not self.sources:
            raise ValueError('CompositeSource: every source is None; keep at least one.')
        first, *others = self.sources.values()
        if mode != 'separate':
            self._check_levels(first, others)
        self.feature_info = self._describe()

    def _check_levels(self, first: FeatureSource, others: List[FeatureSource]) -> None:
        names = list(self.sources)
        for name, other in zip(names[1:], others):
            if len(other.feature_info) != len(first.feature_info):
                raise ValueError(f"CompositeSource mode '{self.mode}': '{name}' has "
                                 f'{len(other.feature_info)} features, {names[0]!r} '
                                 f'{len(first.feature_info)}; level i pairs with level i.')
            if self.mode == 'concat' and other.num_variants != first.num_variants:
                raise ValueError(f"CompositeSource mode 'concat': '{name}' has "
                                 f'{other.num_variants} variants, {names[0]!r} '
                                 f"{first.num_variants}; use mode 'separate' or 'variants'.")
            if self.mode == 'variants':
                channels = [(a['num_chs'], b['num_chs'])
                            for a, b in zip(first.feature_info, other.feature_info)]
                if any(a != b for a, b in channels):
                    raise ValueError(f"CompositeSource mode 'variants': the levels of '{name}' "
                                     f'and {names[0]!r} differ in channels {channels}; use '
                                     "mode 'concat' or 'separate'.")

    def _describe(self) -> List[dict]:
        if self.mode == 'separate':
            return [dict(info, module=f"{name}.{info['module']}")
                    for name, source in self.sources.items() for info in source.feature_info]
        levels = zip(*(s.feature_info for s in self.sources.values()))
        info = []
        for level in levels:
            first = level[0]
            channels = sum(f['num_chs'] for f in level) if self.mode == 'concat' \
                else first['num_chs']
            variants = first['num_variants'] if self.mode == 'concat' \
                else sum(f['num_variants'] for f in level)
            info.append(dict(module='+'.join(f['module'] for f in level), num_chs=channels,
                             reduction=first['reduction'], num_variants=variants))
        return info

    def __repr__(self) -> str:
        inner = ', '.join(f'{name}={source!r}' for name, source in self.sources.items())
        return f'CompositeSource({self.mode!r}, {inner})'

    @property
    def counts(self) -> Counter:
        """The sources' work counters, summed (a fresh sum at every read)."""
        return sum((Counter(getattr(s, 'counts', {})) for s in self.sources.values()),
                   Counter())

    @property
    def variant_names(self) -> List[str]:
        if self.mode == 'concat':
            first = next(iter(self.sources.values()))
            return [f'{n} (all sources)' for n in first.variant_names]
        return [f'{name}: {v}' for name, s in self.sources.items() for v in s.variant_names]

    def to(self, device) -> 'CompositeSource':
        for source in self.sources.values():
            source.to(device)
        return self

    def check_timestep(self, timestep: Optional[int]) -> None:
        for source in self.sources.values():
            source.check_timestep(timestep)

    def _extract(self, pixels: torch.Tensor, timestep: Optional[int],
                 generator: Optional[Noise]) -> List[Features]:
        """Each source on the images (each resizing them itself), combined: a generator
        stream is drawn from in turn; :class:`PerImageNoise` gives each source its own,
        independent noise."""
        outputs = {name: source(pixels, timestep=timestep,
                                generator=generator.part(name)
                                if isinstance(generator, PerImageNoise) else generator)
                   for name, source in self.sources.items()}
        if self.mode == 'separate':
            return [{f'{name}.{key}': value for key, value in variant.items()}
                    for name, per_variant in outputs.items() for variant in per_variant]
        per_source = list(outputs.values())
        levels = [[f['module'] for f in s.feature_info] for s in self.sources.values()]
        combined = []
        for index, info in enumerate(self.feature_info):
            size = per_source[0][0][levels[0][index]].shape[-2:]
            maps = [[_resized(variant[levels[s][index]], size) for variant in per_variant]
                    for s, per_variant in enumerate(per_source)]
            if self.mode == 'concat':  # per variant: the sources' maps side by side
                combined.append([torch.cat(group, dim=1) for group in zip(*maps)])
            else:  # the sources' variants one after another
                combined.append([m for source_maps in maps for m in source_maps])
        names = [f['module'] for f in self.feature_info]
        return [{name: level[v] for name, level in zip(names, combined)}
                for v in range(len(combined[0]))]


def _resized(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=tuple(size), mode='bilinear',
                         align_corners=False).to(x.dtype)
