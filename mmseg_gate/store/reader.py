"""Reading a store: memory-mapped shards, whole images or random pixels.

Shards are opened with safetensors' ``safe_open``, which maps the file instead of reading it:
RAM holds only what a batch reads, however large the store. Features come back at their
native resolution (as the source returns them) or resized on read.
"""
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..sources.base import SourceOutput
from .manifest import StoreError, check_header, read_manifest



class FeatureStore:
    """A complete store in ``folder`` (``tools/extract_features.py``).

    Args:
        folder: the store.
        expect (dict, optional): a header (:func:`make_header`) the store must match;
            ``images`` may be left out of it.
    """

    def __init__(self, folder: str, expect: Optional[Dict] = None):
        manifest = read_manifest(folder)
        if manifest is None:
            raise StoreError(f"No feature store in '{folder}' (no manifest.json): extract one "
                             'with `python tools/extract_features.py CONFIG --out '
                             f'{folder}`.')
        if not manifest.get('complete'):
            raise StoreError(f"The feature store '{folder}' is unfinished (an interrupted "
                             'extraction): rerun tools/extract_features.py with the same '
                             'arguments to finish it.')
        if expect is not None:
            ignore = () if 'images' in expect else ('images', )
            check_header(folder, manifest['header'], expect, ignore)
        self.folder, self.manifest = folder, manifest
        self.records = manifest['records']
        self.feature_info = manifest['feature_info']
        self.variant_names = manifest['variant_names']
        self.keys = [r['key'] for r in self.records]
        self._by_pixels = {}
        for index, record in enumerate(self.records):
            self._by_pixels.setdefault(record['pixels'], index)
            self._check_shard(record)
        self._open = {}

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f'FeatureStore({self.folder!r}, {len(self)} images)'

    @property
    def header(self) -> Dict:
        return self.manifest['header']

    def _check_shard(self, record: Dict) -> None:
        path = osp.join(self.folder, record['shard'])
        if not osp.isfile(path):
            raise StoreError(f"Shard '{path}' of image '{record['key']}' is missing: rerun "
                             'tools/extract_features.py with the same arguments (it extracts '
                             'only missing shards).')
        size = osp.getsize(path)
        if size != record['bytes']:
            raise StoreError(f"Shard '{path}' of image '{record['key']}' is truncated or "
                             f"damaged ({size} bytes, the manifest says {record['bytes']}): "
                             'delete it and rerun tools/extract_features.py with the same '
                             'arguments.')

    def index_of_pixels(self, key: str) -> Optional[int]:
        """The image whose :func:`pixel_key` is ``key``, None if the store lacks it."""
        return self._by_pixels.get(key)

    def _shard(self, index: int):
        if index not in self._open:
            record = self.records[index]
            path = osp.join(self.folder, record['shard'])
            try:
                self._open[index] = safe_open(path, framework='pt')
            except Exception as err:  # noqa: BLE001  (safetensors' error for a torn file)
                raise StoreError(f"Shard '{path}' of image '{record['key']}' is unreadable "
                                 f'({err}): delete it and rerun tools/extract_features.py.'
                                 ) from err
        return self._open[index]

    def names(self, variant: int) -> List[str]:
        """The features stored for ``variant``."""
        prefix = f'{variant}/'
        return [k[len(prefix):] for k in self._shard(0).keys() if k.startswith(prefix)]

    def feature(self, index: int, variant: int, name: str,
                size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(C, h, w) float32 at its native resolution, or resized bilinearly to ``size``."""
        value = self._shard(index).get_tensor(f'{variant}/{name}').float()
        if size is not None and tuple(value.shape[1:]) != tuple(size):
            value = F.interpolate(value[None], size=size, mode='bilinear',
                                  align_corners=False)[0]
        return value

    def features(self, index: int) -> SourceOutput:
        """Image ``index`` as the source returned it: per variant, name -> (1, C, h, w)."""
        return [{name: self.feature(index, v, name)[None] for name in self.names(v)}
                for v in range(len(self.variant_names))]

    def sample_pixels(self, index: int, ys: torch.Tensor, xs: torch.Tensor,
                      size: Tuple[int, int], names: Optional[Sequence[str]] = None,
                      variant: int = 0) -> torch.Tensor:
        """Features at pixels (``ys``, ``xs``) of a ``size`` grid (e.g. the labels'), bilinear
        from the native maps exactly as resizing the whole map to ``size`` would give them,
        without resizing it: (P, sum of C) for ``names`` (default: all of the variant)."""
        images = torch.zeros_like(ys)
        return torch.cat([bilinear_at(self.feature(index, variant, name)[None], images, ys, xs,
                                      size) for name in names or self.names(variant)], dim=1)


def nearest_index(index: torch.Tensor, out: int, native: int) -> torch.Tensor:
    """The native index ``F.interpolate(mode='nearest')`` reads for output ``index`` of an
    ``out``-long axis (PyTorch's float32 ``floor(index * native / out)``)."""
    if out == native:
        return index
    scale = torch.tensor(native, dtype=torch.float32) / out
    return (index.float() * scale).floor().long().clamp(max=native - 1)


def bilinear_at(maps: torch.Tensor, images: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                size: Tuple[int, int], via: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """``F.interpolate(maps, size, mode='bilinear', align_corners=False)[images, :, ys, xs]``
    without building the resized maps: maps (N, C, h, w), pixel ``i`` of image ``images[i]``
    at (``ys[i]``, ``xs[i]``) of the ``size`` grid -> (P, C) float32.

    With ``via``, the maps are first resized nearest-neighbour to ``via`` (the GATE
    authors' extraction), then bilinearly to ``size``: still without building either."""
    def axis(dst: torch.Tensor, out: int, native: int, mid: Optional[int]):
        grid = mid or native
        src = ((dst.double() + 0.5) * (grid / out) - 0.5).clamp(min=0)
        low = src.floor().long().clamp(max=grid - 1)
        high, weight = (low + 1).clamp(max=grid - 1), (src - low).float()[:, None]
        if mid is not None:
            low, high = nearest_index(low, mid, native), nearest_index(high, mid, native)
        return low, high, weight
    via = via or (None, None)
    y0, y1, wy = axis(ys, size[0], maps.shape[2], via[0])
    x0, x1, wx = axis(xs, size[1], maps.shape[3], via[1])

    def at(y, x):
        return maps[images, :, y, x].float()
    return ((1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x1))
            + wy * ((1 - wx) * at(y1, x0) + wx * at(y1, x1)))
