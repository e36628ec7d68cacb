"""Extracting a store: every image once, with its fixed noise, resumable and distributed.

Each image is one call of the source (all its variants in one batch) with its own noise,
drawn from ``noise_seed`` and the image's pixels (``PerImageNoise``: the noise the backbone
draws for it in eval mode and the correspondence protocol draws for it; another image gets
another noise field), so an image's features do not depend on which process extracts it or
in which order: a killed run resumed, or N processes, give the same bytes as one
uninterrupted process (at the same number of threads). Each image's shard is
written atomically; the manifest is complete only once every shard exists.

Each shard also records what made it (the header's settings and its image's key), and a
finished shard is kept only if that equals what the run asks for: a store whose manifest was
lost is never relabelled by a run with other settings. An extraction holds the store's lock
(``extraction.lock``; the kernel drops it when the process dies), so a second extraction into
the same store stops at once with a clear error instead of racing the first.
"""
import json
import os
import os.path as osp
import re
from contextlib import ExitStack, contextmanager
from typing import Callable, Dict, List, Optional

import torch
from mmengine.dist import barrier, broadcast_object_list, get_dist_info
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..datasets.image_lists import ImageList
from ..datasets.images import pixel_key
from ..engine.flops import count_flops
from ..fileio import FolderLocked, atomic_file, exclusive_lock, remove_stale_temporaries
from ..sources import build_source
from ..sources.base import COUNTS
from ..sources.common.latents import PerImageNoise
from .manifest import (StoreError, check_header, check_store_folder, differences, make_header,
                       read_manifest, shard_name, to_plain, write_manifest)
from .reader import FeatureStore

DTYPES = dict(float16=torch.float16, float32=torch.float32)


def _read_shard_metadata(path: str) -> Optional[Dict]:
    """A finished shard's record; None if it is missing or unreadable (truncated)."""
    if not osp.isfile(path):
        return None
    try:
        with safe_open(path, framework='pt') as f:
            return json.loads(f.metadata()['record'])
    except Exception:  # noqa: BLE001  (safetensors' own error for a torn file)
        return None


def _features_to_tensors(features: List[Dict[str, torch.Tensor]], dtype: torch.dtype,
                         key: str) -> Dict[str, torch.Tensor]:
    tensors = {}
    for v, variant in enumerate(features):
        for name, value in variant.items():
            stored = value[0].detach().to('cpu', dtype).contiguous()
            if not torch.isfinite(stored).all():
                raise StoreError(f"Feature '{name}' of variant {v} of image '{key}' is not "
                                 f'finite in {dtype} (|x| up to {value.abs().max().item():.3g}'
                                 '): extract with --dtype float32.')
            tensors[f'{v}/{name}'] = stored
    return tensors


SHARD_FILE = re.compile(r'\d{6}\.safetensors')
LOCK = 'extraction.lock'


def shard_settings(header: Dict) -> Dict:
    """What a shard records of the store's header: everything but the image list (the shard
    records its own image's key)."""
    return {k: v for k, v in header.items() if k != 'images'}


def check_finished_shard(path: str, metadata: Dict, settings: Dict, key: str,
                         vouched: bool) -> None:
    """Refuse to adopt a finished shard made by other settings or for another image.
    ``vouched``: a manifest of these settings exists, which speaks for shards of older
    versions that did not record their own."""
    if 'settings' not in metadata:
        if vouched:
            return
        raise StoreError(f"Shard '{path}' was written by an older mmseg_gate that did not "
                         'record its settings, and the store has no manifest to vouch for '
                         'it: remove the store and extract it again.')
    found = differences(metadata['settings'], settings)
    if metadata.get('key') != key:
        found.append(f"image: the shard holds {metadata.get('key')!r}, asked for {key!r}")
    if found:
        raise StoreError(
            f"Shard '{path}' was extracted with other settings than this run asks for:\n  "
            + '\n  '.join(found) + '\nIts store was made by another config (was its '
            'manifest.json removed?). Extract into another --out / --features folder, or '
            'remove this one to extract it again.')


@contextmanager
def store_lock(folder: str):
    """The store's lock, taken by rank 0 for the whole job; every rank stops if it is held."""
    rank, _ = get_dist_info()
    with ExitStack() as stack:
        refused = [None]
        if rank == 0:
            os.makedirs(folder, exist_ok=True)
            try:
                stack.enter_context(exclusive_lock(osp.join(folder, LOCK)))
            except FolderLocked as err:
                refused[0] = (f"Another extraction is writing the feature store '{folder}' "
                              f'right now ({err}). Wait for it to finish and rerun (the '
                              'finished images are kept), or extract into another folder.')
        broadcast_object_list(refused)
        if refused[0]:
            raise StoreError(refused[0])
        yield


def remove_partial_writes(shards: str) -> None:
    """Delete whatever a killed extraction left in ``shards`` besides shards: our own
    temporaries, and those of safetensors' writer, which writes through a hidden
    ``.tmpXXXXXX`` file of its own before renaming it."""
    remove_stale_temporaries(shards)
    for name in os.listdir(shards):
        if not SHARD_FILE.fullmatch(name) and osp.isfile(osp.join(shards, name)):
            os.remove(osp.join(shards, name))


def finished_images(folder: str) -> int:
    """How many images of the store in ``folder`` are extracted (0 if there is none)."""
    shards = osp.join(folder, 'shards')
    if not osp.isdir(shards):
        return 0
    return sum(_read_shard_metadata(osp.join(shards, name)) is not None
               for name in os.listdir(shards) if name.endswith('.safetensors'))


def _extract_one(source, image: torch.Tensor, noise_seed: int, device,
                 flops_by_shape: Dict) -> tuple:
    """The source's features of one image, its FLOPs and passes. FLOPs depend on the shape
    only, so torch's counter (slow for small models) runs once per shape."""
    before = dict(getattr(source, 'counts', {}))
    out = []

    def call():
        with torch.no_grad():
            out.append(source(image[None].to(device),
                              generator=PerImageNoise.for_images(image[None], noise_seed)))
    shape = tuple(image.shape)
    if shape in flops_by_shape:
        call()
    else:
        flops_by_shape[shape] = count_flops(call)
    after = getattr(source, 'counts', {})  # read again: a composite's is a fresh sum
    passes = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTS if k in after}
    return out[0], flops_by_shape[shape], passes


def extract_features(source_cfg, images: ImageList, folder: str, noise_seed: int = 0,
                     dtype: str = 'float16', device='cpu', progress: bool = True,
                     make_source: Callable = build_source) -> FeatureStore:
    """Extract (or finish extracting) the store of ``images`` in ``folder`` and return it.

    A store there from other settings is refused (fields named); finished images are kept
    and checked (their pixels must not have changed); the source is built only if an image
    is missing. Under ``torchrun`` each process extracts every ``world_size``-th image and
    rank 0 writes the complete manifest."""
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {dtype!r}.')
    check_store_folder(folder)
    header, paths = make_header(source_cfg, noise_seed, dtype, images.keys)
    with store_lock(folder):
        _extract(source_cfg, images, folder, header, paths, noise_seed, dtype, device,
                 progress, make_source)
    return FeatureStore(folder)


def _extract(source_cfg, images: ImageList, folder: str, header: Dict, paths: Dict,
             noise_seed: int, dtype: str, device, progress: bool,
             make_source: Callable) -> None:
    rank, world = get_dist_info()
    settings = shard_settings(header)
    existing = read_manifest(folder)
    if existing is not None:
        check_header(folder, existing['header'], header)
    todo = []
    # Finished shards are checked before a new manifest names their settings.
    for index in range(rank, len(images), world):
        path = osp.join(folder, shard_name(index))
        metadata = _read_shard_metadata(path)
        if metadata is None:
            todo.append(index)
            continue
        check_finished_shard(path, metadata, settings, images.keys[index],
                             vouched=existing is not None)
        if metadata.get('pixels') != pixel_key(_load(images, index, folder)):
            raise StoreError(
                f"Image '{images.paths[index]}' changed since it was extracted into "
                f"'{folder}' (other pixels: another file, or other resizing). Remove the store "
                'to extract it again.')
    barrier()
    if rank == 0:
        os.makedirs(osp.join(folder, 'shards'), exist_ok=True)
        remove_partial_writes(osp.join(folder, 'shards'))
        if existing is None:
            write_manifest(folder, dict(header=header, paths=paths, complete=False))
    barrier()
    if rank == 0:
        stored = sum(osp.isfile(osp.join(folder, shard_name(i))) for i in range(len(images)))
        print(f'[extract_features] {folder}: {len(images)} images, {stored} stored before'
              + (f', extracting on {world} processes' if world > 1 else ''), flush=True)
    if todo:
        source = make_source(source_cfg).to(device)
        bar = tqdm(todo, desc='extracting', unit='image', disable=not progress or rank != 0)
        flops_by_shape = {}
        for index in bar:
            image = _load(images, index, folder)
            features, flops, passes = _extract_one(source, image, noise_seed, device,
                                                   flops_by_shape)
            record = dict(key=images.keys[index], pixels=pixel_key(image),
                          shape=list(image.shape), flops=flops, passes=passes,
                          feature_info=to_plain(source.feature_info),
                          variant_names=list(source.variant_names), settings=settings)
            path = osp.join(folder, shard_name(index))
            with atomic_file(path) as tmp:
                # One metadata entry: safetensors writes several in a random order.
                save_file(_features_to_tensors(features, DTYPES[dtype], images.keys[index]),
                          tmp, metadata=dict(record=json.dumps(record, sort_keys=True)))
    barrier()
    if rank == 0:
        _finish(folder, header, paths, len(images))
    barrier()


def _load(images: ImageList, index: int, folder: str) -> torch.Tensor:
    try:
        return images.load(index)
    except (OSError, ValueError) as err:
        raise StoreError(
            f"Cannot extract '{images.paths[index]}': {err}\nThe images finished so far stay "
            f"in '{folder}'; fix or remove that file and rerun to continue.") from err


def _finish(folder: str, header: Dict, paths: Dict, count: int) -> None:
    """The complete manifest, from the shards' own metadata."""
    records, first = [], None
    for index in range(count):
        name = shard_name(index)
        metadata = _read_shard_metadata(osp.join(folder, name))
        if metadata is None:
            raise StoreError(f"Shard '{osp.join(folder, name)}' of image "
                             f"'{header['images'][index]}' is missing or unreadable after "
                             'extraction: rerun to extract it.')
        first = first or metadata
        records.append(dict(key=metadata['key'], pixels=metadata['pixels'],
                            shape=metadata['shape'], shard=name,
                            bytes=osp.getsize(osp.join(folder, name)),
                            flops=metadata['flops'], passes=metadata['passes']))
    total = sum(r['flops'] for r in records)
    passes = {}
    for record in records:
        for k, v in record['passes'].items():
            passes[k] = passes.get(k, 0) + v
    write_manifest(folder, dict(
        header=header, paths=paths, complete=True, records=records,
        feature_info=first['feature_info'] if first else [],
        variant_names=first['variant_names'] if first else [],
        cost=dict(images=count, flops=total, passes=passes,
                  flops_per_image=total / count if count else 0)))
