"""Frozen features of SPair images: computed once per image with a fixed noise and cached,
or read raw (training-free).
"""
import os.path as osp
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ...datasets.image_lists import ImageList
from ...datasets.images import read_longest, read_square
from ...datasets.spair import DHF_FILES, load_dhf_pairs, load_pairs
from ...sources.base import SourceOutput
from ...sources.common.latents import PerImageNoise

RESIZES = ('square', 'longest')


def image_reader(data) -> Callable[[str], torch.Tensor]:
    """How the protocol reads an image (``data``: the config's ``data``): ``resize='square'``
    (default), the whole image resized to ``image_size`` squared (the GATE authors' and
    Diffusion Hyperfeatures' plain resize); ``'longest'``, the longer side resized to
    ``image_size`` with the aspect ratio kept, sides multiples of ``size_multiple`` (DIFT's
    and DiTF's: 640, 16)."""
    resize, size = data.get('resize', 'square'), data.image_size
    if resize not in RESIZES:
        raise ValueError(f'data.resize must be one of {RESIZES}, got {resize!r}.')
    if resize == 'longest':
        multiple = data.get('size_multiple', 16)
        return lambda path: read_longest(path, size, multiple)[0]
    return lambda path: read_square(path, size, crop=False)[0]


class FeatureCache:
    """Features of images by path, each computed once with its own fixed noise (drawn from
    ``seed`` and the image's pixels, as a feature store draws it: independent per image), the
    last ``capacity`` kept. ``requests``
    and ``misses`` count the lookups and the source calls they needed.

    Args:
        source: a feature source (``mmseg_gate.sources``), already on ``device``.
        image_size: images are resized to ``image_size`` squared (the authors' plain resize),
            unless ``read`` is given.
        device: where the images go.
        read: path -> (3, H, W) image in [-1, 1] (:func:`image_reader` of the config).
    """

    def __init__(self, source, image_size: int, device='cpu', seed: int = 0,
                 capacity: int = 256, read: Optional[Callable[[str], torch.Tensor]] = None):
        self.source, self.image_size, self.seed = source, image_size, seed
        self.read = read or (lambda path: read_square(path, image_size, crop=False)[0])
        self.device = torch.device(device)
        self.capacity, self.kept = capacity, OrderedDict()
        self.requests = self.misses = 0

    def __call__(self, path: str) -> SourceOutput:
        self.requests += 1
        if path in self.kept:
            self.kept.move_to_end(path)
            return self.kept[path]
        self.misses += 1
        image = self.read(path)
        with torch.no_grad():  # each image's own noise, drawn on the CPU (any device)
            feats = self.source(image[None].to(self.device),
                                generator=PerImageNoise.for_images(image[None], self.seed))
        self.kept[path] = feats
        if len(self.kept) > self.capacity:
            self.kept.popitem(last=False)
        return feats


SPLIT_FILES = ('spair', 'dhf')


def protocol_pairs(data) -> Dict[str, List[dict]]:
    """The pairs of each split the protocol reads (``data``: the config's ``data``):
    ``split_files='spair'``, SPair's own Layout lists (``train_split``, ``val_split``,
    ``test_split``, the first ``val_per_category`` / ``test_per_category`` of each category);
    ``'dhf'``, Diffusion Hyperfeatures' split files (``dhf_files``, in ``dhf_folder``,
    default ``<root>/JPEGImages``, where the GATE authors put them), and with
    ``full_test=True`` SPair's whole test split beside them as ``test_full``."""
    kind = data.get('split_files', 'spair')
    if kind not in SPLIT_FILES:
        raise ValueError(f"data.split_files must be one of {SPLIT_FILES}, got {kind!r}.")
    if kind == 'spair':
        return dict(train=load_pairs(data.root, data.train_split),
                    val=load_pairs(data.root, data.val_split,
                                   per_category=data.get('val_per_category')),
                    test=load_pairs(data.root, data.test_split,
                                    per_category=data.get('test_per_category')))
    images = osp.join(data.root, 'JPEGImages')
    folder = data.get('dhf_folder') or images
    files = dict(DHF_FILES, **(data.get('dhf_files') or {}))
    pairs = {split: load_dhf_pairs(osp.join(folder, files[split]), images)
             for split in ('train', 'val', 'test')}
    if data.get('full_test'):
        pairs['test_full'] = load_pairs(data.root, 'test')
    return pairs


def spair_images(data, splits: Optional[Sequence[str]] = None,
                 pairs: Optional[Dict[str, List[dict]]] = None) -> ImageList:
    """Every image of the splits' pairs (``pairs``: :func:`protocol_pairs`, read if not
    given; ``splits``: all of them by default), as :class:`FeatureCache` reads it; keys are
    paths relative to the data root."""
    pairs = pairs or protocol_pairs(data)
    paths = list(dict.fromkeys(p[f'{side}_path'] for split in (splits or pairs)
                               for p in pairs[split] for side in ('src', 'trg')))
    read = image_reader(data)
    return ImageList([osp.relpath(p, data.root) for p in paths], paths,
                     lambda i: read(paths[i]))


def raw_features(feats: SourceOutput, names: Sequence[str] = None,
                 weights: Optional[Dict[str, float]] = None) -> torch.Tensor:
    """Training-free features: each feature L2-normalised over channels, resized to the
    finest one's grid and concatenated per variant, then averaged over the variants holding
    the same features. Variants holding different ones (the sources of a composite kept
    apart) form groups: each group's vector is L2-normalised and weighted (``weights``: source
    name -> weight, default 1) and the groups concatenated -- SD-DINO's fusion of Stable
    Diffusion's and DINOv2's normalised features."""
    names = list(names or dict.fromkeys(n for v in feats for n in v))
    size = max((v[n].shape[2:] for v in feats for n in names if n in v),
               key=lambda s: s[0] * s[1])
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for variant in feats:
        held = tuple(n for n in names if n in variant)
        groups.setdefault(held, []).append(torch.cat([
            F.interpolate(F.normalize(variant[n].float(), dim=1), size=size, mode='bilinear',
                          align_corners=False) for n in held], dim=1))
    if len(groups) == 1:
        return torch.stack(next(iter(groups.values()))).mean(dim=0)
    weights = weights or {}
    return torch.cat([weights.get(held[0].split('.')[0], 1.0)
                      * F.normalize(torch.stack(group).mean(dim=0), dim=1)
                      for held, group in groups.items()], dim=1)


def batch_features(*feats: SourceOutput) -> SourceOutput:
    """Several images' features as one batch (per variant, per tap)."""
    return [{name: torch.cat([f[v][name] for f in feats]) for name in feats[0][v]}
            for v in range(len(feats[0]))]
