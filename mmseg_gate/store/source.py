"""Stored features as a source: the frozen half read from a store instead of computed.

A drop-in for the source it was extracted from (``backbone.source=dict(type='StoredSource',
store=DIR, source=<that source's config>)``): the same ``feature_info`` and variants, no model
loaded, no FLOPs spent. Each image is found by its exact pixels, so a store can never serve
features of another image; pixels it lacks (another resize, a random augmentation) are an
error, never a fallback to computing. The noise is the store's fixed noise: the call's
generator is not used.
"""
from typing import List, Optional

import torch

from ..datasets.images import pixel_key
from ..sources.base import SOURCES, FeatureSource, Features
from .manifest import StoreError, make_header
from .reader import FeatureStore


@SOURCES.register_module()
class StoredSource(FeatureSource):
    """Features of the images in a store (``tools/extract_features.py``).

    Args:
        store (str | FeatureStore): the store folder.
        source (dict, optional): the config of the source the store must come from; its
            weights, taps, timestep and variants are compared with the store's manifest and a
            mismatch is refused, naming the fields. Without it the store is taken as it is.
        noise_seed (int): the noise seed the store must have been extracted with. Default: 0.
        dtype (str): the stored dtype asked for (compared with ``source``). Default: float16.
    """

    def __init__(self, store, source: Optional[dict] = None, noise_seed: int = 0,
                 dtype: str = 'float16'):
        expect = None if source is None else make_header(source, noise_seed, dtype)[0]
        self.store = store if isinstance(store, FeatureStore) else FeatureStore(store, expect)
        self.feature_info = [dict(info) for info in self.store.feature_info]
        self.timestep = self.store.header['source'].get('timestep')  # None: the default
        self.device = torch.device('cpu')

    def __repr__(self) -> str:
        return f'StoredSource({self.store.folder!r}, {len(self.store)} images)'

    @property
    def variant_names(self) -> List[str]:
        return list(self.store.variant_names)

    def to(self, device) -> 'StoredSource':
        self.device = torch.device(device)
        return self

    def check_timestep(self, timestep: Optional[int]) -> None:
        if timestep is not None and timestep != self.timestep:
            raise ValueError(f'{self!r} holds features at t = {self.timestep} only; asked for '
                             f't = {timestep}. Extract a store at that timestep, or use the '
                             'source itself.')

    def _extract(self, pixels: torch.Tensor, timestep: Optional[int],
                 generator=None) -> List[Features]:
        """The stored features of the images, found by their pixels."""
        found = []
        for image in pixels:
            index = self.store.index_of_pixels(pixel_key(image))
            if index is None:
                raise StoreError(
                    f'An image of shape {tuple(image.shape)} is not in the feature store '
                    f"'{self.store.folder}' (no stored image has its pixels). A store serves "
                    'only the exact images it was extracted from: the same files, the same '
                    'resizing, no random augmentation. Extract the missing images with '
                    'tools/extract_features.py, or use the source itself.')
            found.append(self.store.features(index))
        return [{name: torch.cat([f[v][name] for f in found]).to(self.device)
                 for name in found[0][v]} for v in range(len(found[0]))]
