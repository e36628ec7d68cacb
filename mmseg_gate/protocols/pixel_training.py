"""The benchmark's classifier training on stored features: random pixels, member by member.

DDPM-segmentation (and the GATE authors after it) train each ensemble member on its own:
every training pixel whose label is not ignored is one sample, shuffled into batches of 64
(the last partial batch dropped), Adam 1e-3, at most 100 epochs; from the fifth epoch on a
member stops once more than 50 consecutive batches fail to lower its best batch loss. The
authors add their sparsity term with a lambda that random-walks from 0 (below). Prediction is
the majority vote of the members' argmax at the labels' resolution.

Here the features come from a store (``mmseg_gate.store``): the training images' native maps
are held in RAM (their stored size: 1.5 GB for Horse-21's 30 images at SD1.5 shapes) and each
batch is read bilinearly at its pixels, which equals the benchmark's resizing of every map to
the labels' 256x256 (the authors hold those: 231 GB) without building it. With
``pixel_ensemble.nearest_first`` the named sources' maps are read as the authors' extraction
leaves them: resized nearest-neighbour to the variant's largest map (SD1.5's 64x64), then
bilinearly to the labels' size.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.evaluator import Evaluator
from safetensors.torch import load_file, save_file

from ..datasets.image_lists import DatasetImages
from ..datasets.images import pixel_key
from ..fileio import atomic_file
from ..models.amalgamation import SparsityWalk, sparsity_loss
from ..models.pixel_ensemble import PixelMember
from ..store import FeatureStore
from ..store.reader import bilinear_at

Groups = List[Tuple[Tuple[int, ...], Tuple[str, ...]]]  # (variants, feature names) per group


def feature_groups(store: FeatureStore) -> Groups:
    """Variants holding the same features form one group (their buckets): all SD variants
    one group; a second source (e.g. ADM's timesteps) another."""
    groups: Dict[Tuple[str, ...], List[int]] = {}
    for variant in range(len(store.variant_names)):
        groups.setdefault(tuple(store.names(variant)), []).append(variant)
    return [(tuple(variants), names) for names, variants in groups.items()]


def nearest_grids(store: FeatureStore, nearest_first: Union[bool, Sequence[str]]
                  ) -> Dict[int, Optional[Tuple[int, int]]]:
    """Per variant, the grid its maps are first resized to nearest-neighbour (its largest
    map's height and width, as the authors' ``extract_feature.py --aggregate_output``), or
    None (bilinear from the native maps). ``nearest_first``: True for every variant, or the
    names of the composite source's parts it applies to (variants named ``'<part>: ...'``)."""
    if isinstance(nearest_first, str):
        nearest_first = (nearest_first, )
    grids = {}
    for variant, label in enumerate(store.variant_names):
        part = label.split(': ', 1)[0] if ': ' in label else None
        if nearest_first is True or (part is not None and part in (nearest_first or ())):
            shapes = [store.feature(0, variant, name).shape[1:] for name in store.names(variant)]
            grids[variant] = (max(s[0] for s in shapes), max(s[1] for s in shapes))
        else:
            grids[variant] = None
    parts = {label.split(': ', 1)[0] for label in store.variant_names if ': ' in label}
    unknown = [] if isinstance(nearest_first, bool) else sorted(set(nearest_first) - parts)
    if unknown:
        raise ValueError(f'pixel_ensemble.nearest_first names {unknown}, which are not parts '
                         f"of the store '{store.folder}' (its parts: {sorted(parts)}); name "
                         'parts of the composite source, or set it to True for every variant.')
    return grids


class PixelBank:
    """Images of a split from a store, with their labels: features of any pixels, read
    bilinearly at the labels' resolution from the native maps held in RAM (float16) --
    through a nearest-neighbour grid first for the variants ``nearest_first`` names
    (:func:`nearest_grids`). When the training pixels' features fit in ``table_bytes`` they
    are read once into a table (float16) that batches index, the same values faster, and
    the maps are let go."""

    def __init__(self, store: FeatureStore, indices: Sequence[int],
                 labels: Sequence[torch.Tensor], ignore_index: int,
                 table_bytes: float, nearest_first: Union[bool, Sequence[str]]):
        self.groups = feature_groups(store)
        self.via = nearest_grids(store, nearest_first)
        self.maps = {(v, name): torch.stack([store.feature(i, v, name).half() for i in indices])
                     for variants, names in self.groups for v in variants for name in names}
        self.labels = torch.stack([label.long() for label in labels])
        self.size = tuple(self.labels.shape[1:])
        n, y, x = torch.nonzero(self.labels != ignore_index, as_tuple=True)
        self.pixels = torch.stack([n, y, x], dim=1)  # the training samples
        self.targets = self.labels[n, y, x]
        self.shapes = [(len(variants), sum(self.maps[variants[0], name].shape[1]
                                           for name in names))
                       for variants, names in self.groups]
        self.table = None
        if len(self.pixels) * sum(b * c for b, c in self.shapes) * 2 <= table_bytes:
            chunks = [self.features(*self.pixels[i:i + 8192].unbind(1))
                      for i in range(0, len(self.pixels), 8192)]
            self.table = [torch.cat([c[g] for c in chunks]).half()
                          for g in range(len(self.groups))]
            self.maps = None

    def group_shapes(self) -> List[Tuple[int, int]]:
        """(buckets, channels) per group, for :class:`PixelMember`."""
        return list(self.shapes)

    def samples(self, rows: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Training samples ``rows`` (of ``pixels``): per group features, and labels."""
        if self.table is not None:
            return [t[rows].float() for t in self.table], self.targets[rows]
        return self.features(*self.pixels[rows].unbind(1)), self.targets[rows]

    def features(self, images: torch.Tensor, ys: torch.Tensor,
                 xs: torch.Tensor) -> List[torch.Tensor]:
        """Per group (P, buckets, channels) float32 at pixels (``ys``, ``xs``) of the labels'
        grid of images ``images``."""
        return [torch.stack([torch.cat([bilinear_at(self.maps[v, name], images, ys, xs,
                                                    self.size, self.via[v])
                                        for name in names], dim=1)
                             for v in variants], dim=1)
                for variants, names in self.groups]


def train_member(member: PixelMember, bank: PixelBank, seed: int, batch_size: int = 64,
                 lr: float = 1e-3, max_epochs: int = 100, min_epochs: int = 4,
                 patience: int = 50, sparsity='random_walk') -> Dict:
    """Train one member the benchmark's way (module docstring); ``sparsity``: the
    authors' random walk, or a fixed lambda (0: none). Returns what happened."""
    device = next(member.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    walk = SparsityWalk(np.random.default_rng(seed))
    optimizer = torch.optim.Adam(member.parameters(), lr=lr)
    member.train()
    best, waited, iteration, stopped = float('inf'), 0, 0, None
    for epoch in range(max_epochs):
        order = torch.randperm(len(bank.pixels), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            features, targets = bank.samples(order[start:start + batch_size])
            loss = F.cross_entropy(member([f.to(device) for f in features]), targets.to(device))
            lam = walk.value if sparsity == 'random_walk' else float(sparsity)
            total = loss + sparsity_loss(member.sparsity(), loss, lam) if lam else loss
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            walk.update(iteration, loss.item())
            iteration += 1
            if epoch >= min_epochs:
                if loss.item() < best:
                    best, waited = loss.item(), 0
                else:
                    waited += 1
                if waited > patience:
                    stopped = epoch
                    break
        if stopped is not None:
            break
    return dict(iterations=iteration, epochs=epoch + 1, early_stopped=stopped is not None,
                last_loss=loss.item(), sparsity_lambda=walk.value)


@torch.no_grad()
def predict(members: Sequence[PixelMember], bank: PixelBank, image: int,
            chunk: int = 4096) -> torch.Tensor:
    """The majority vote of the members' argmax at every pixel of an image (ties: the
    lowest class), (H, W)."""
    height, width = bank.size
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij')
    ys, xs = ys.flatten(), xs.flatten()
    images = torch.full_like(ys, image)
    votes = None
    for member in members:
        member.eval()
        device = next(member.parameters()).device
        labels = torch.cat([member([f.to(device) for f in bank.features(
            images[i:i + chunk], ys[i:i + chunk], xs[i:i + chunk])]).argmax(dim=1).cpu()
                            for i in range(0, len(ys), chunk)])
        hits = F.one_hot(labels, member.classifier[-1].out_features)
        votes = hits if votes is None else votes + hits
    return votes.argmax(dim=1).view(height, width)


def split_bank(cfg, split: str, store: FeatureStore, nearest_first: Union[bool, Sequence[str]],
               table_bytes: float = 2 * 1024**3) -> Tuple[PixelBank, List, Dict]:
    """The split's images from the store (found by their pixels) with their labels, their
    data samples and the dataset's metainfo."""
    images = DatasetImages(cfg, split)
    indices, labels, samples = [], [], []
    for i in range(len(images)):
        pixels, sample = images.sample(i)
        index = store.index_of_pixels(pixel_key(pixels))
        if index is None:
            raise ValueError(f"'{images.paths[i]}' is not in the feature store "
                             f"'{store.folder}': extract the split's images first.")
        indices.append(index)
        labels.append(sample.gt_sem_seg.data[0])
        samples.append(sample)
    ignore = cfg.model.decode_head.get('ignore_index', 255)
    return (PixelBank(store, indices, labels, ignore, table_bytes, nearest_first), samples,
            images.dataset.metainfo)


def run_pixel_split(cfg, store: FeatureStore, work_dir: str,
                    device='cpu') -> Dict[str, float]:
    """Train the members on ``device`` (each saved when done: a rerun trains only the missing
    ones), then predict the test images and score them with the config's
    ``test_evaluator``."""
    settings = dict(cfg.pixel_ensemble)
    num_members = settings.pop('num_members', 10)
    seed = settings.pop('seed', 0)
    member_cfg = settings.pop('member', {})
    nearest_first = settings.pop('nearest_first', ())  # bilinear from the native maps
    train, _, _ = split_bank(cfg, 'train', store, nearest_first)
    members, log = [], []
    for k in range(num_members):
        torch.manual_seed(seed + k)
        member = PixelMember(train.group_shapes(), cfg.model.decode_head.num_classes,
                             **member_cfg).to(device)
        path = osp.join(work_dir, f'member_{k}.safetensors')
        if osp.isfile(path):
            try:
                member.load_state_dict(load_file(path, device=str(device)))
            except (RuntimeError, OSError) as err:
                raise ValueError(f"'{path}' is not a member of this ensemble ({err}); remove "
                                 'it to train the member again.') from err
        else:
            log.append(dict(member=k, **train_member(member, train, seed + k, **settings)))
            with atomic_file(path) as tmp:
                save_file({name: value.cpu() for name, value in member.state_dict().items()},
                          tmp)
        members.append(member)
    del train
    test, samples, metainfo = split_bank(cfg, 'test', store, nearest_first,
                                         table_bytes=0)  # whole maps
    evaluator = Evaluator(cfg.test_evaluator)
    evaluator.dataset_meta = metainfo
    for i, sample in enumerate(samples):
        prediction = predict(members, test, i)
        evaluator.process([dict(pred_sem_seg=dict(data=prediction[None]),
                                gt_sem_seg=dict(data=sample.gt_sem_seg.data))])
    results = {k: float(v) for k, v in evaluator.evaluate(len(samples)).items()}
    if log:
        os.makedirs(work_dir, exist_ok=True)
        with atomic_file(osp.join(work_dir, 'members.json')) as tmp, open(tmp, 'w') as f:
            json.dump(log, f, indent=1)
    return results
