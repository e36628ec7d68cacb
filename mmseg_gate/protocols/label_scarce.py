"""The label-scarce protocol: train and test on the fixed split and on random re-splits.

Two protocols are in use and both are reported, by name: DDPM-segmentation's, one fixed split
(the first ``num_train`` sorted training images and the first ``num_test`` sorted test
images, its ``training_number`` / ``testing_number``), and the GATE authors', the mean ± std
over random re-splits of those train+test images into sets of the same sizes. Each split
runs in its own work folder (``<work_dir>/<split>/``: ``fixed``, ``random0``, ...) with the
split's image lists as ``ann_file``s: the paper's pixel ensemble (the config's
``pixel_ensemble``, :mod:`.pixel_training`), or with ``pixel_ensemble=None`` one MMEngine
run of the config's segmentor. Its result is written when it finishes, so a rerun skips
finished splits and resumes an unfinished one (trained members, or the last checkpoint).

By default the frozen half runs once: every image of train+test is extracted into a feature
store (``mmseg_gate.store``, fixed noise, as the benchmark extracts its features once) and every
split trains and tests on it (the segmentor through :class:`StoredSource`); re-splits change the
image lists, not the features. The report says what the frozen half cost with the store and what
recomputing it for every training and test image would have cost.
"""
import copy
import glob
import json
import os
import os.path as osp
from typing import Dict, List, Optional

import numpy as np
from mmengine.config import Config
from mmengine.logging import print_log

from ..datasets.image_lists import dataset_images
from ..fileio import atomic_file
from ..store import FeatureStore, extract_features
from ..store.writer import finished_images
from .pixel_training import run_pixel_split


def list_images(data_root: str, folder: str, img_suffix: str) -> List[str]:
    """Images under ``data_root/folder`` (recursively, as the benchmark reads them) as paths
    relative to ``data_root`` without suffix, sorted."""
    base = osp.join(data_root, folder)
    files = glob.glob(osp.join(glob.escape(base), '**', '*' + img_suffix), recursive=True)
    if not files:
        raise FileNotFoundError(f"No '*{img_suffix}' images in '{base}'. Get the benchmark "
                                'with `bash datasets/download_datasets.sh` from '
                                'https://github.com/yandex-research/ddpm-segmentation.')
    return sorted(osp.relpath(f, data_root)[:-len(img_suffix)] for f in files)


def fixed_split(train: List[str], test: List[str], num_train: Optional[int] = None,
                num_test: Optional[int] = None) -> Dict:
    """DDPM-segmentation's split: the first ``num_train`` of the sorted training images and
    the first ``num_test`` of the sorted test images (None: all of them). The counts are
    caps, as its ``training_number`` / ``testing_number`` slice the sorted lists: a folder
    with fewer images gives all of them (and a log line says so)."""
    for name, images, count in (('training', train, num_train), ('test', test, num_test)):
        if count is not None and count > len(images):
            print_log(f'The fixed split takes up to {count} {name} images; there are '
                      f'{len(images)}: all of them are used.', logger='current')
    return dict(name='fixed', train=sorted(train)[:num_train], test=sorted(test)[:num_test])


def make_splits(train: List[str], test: List[str], num_random: int, seed: int = 0,
                num_train: Optional[int] = None, num_test: Optional[int] = None) -> List[Dict]:
    """The fixed split (:func:`fixed_split`), then ``num_random`` random re-splits of its
    train+test with its sizes (split i shuffles with ``seed + i``)."""
    fixed = fixed_split(train, test, num_train, num_test)
    splits = [fixed]
    pool = fixed['train'] + fixed['test']
    for i in range(num_random):
        order = np.random.default_rng(seed + i).permutation(len(pool))
        shuffled = [pool[j] for j in order]
        splits.append(dict(name=f'random{i}', train=sorted(shuffled[:len(fixed['train'])]),
                           test=sorted(shuffled[len(fixed['train']):])))
    return splits


def _write_lines(path: str, lines: List[str]) -> str:
    with atomic_file(path) as tmp, open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return osp.abspath(path)


def split_config(cfg: Config, split: Dict, work_dir: str) -> Config:
    """``cfg`` training on ``split['train']`` and testing on ``split['test']`` in
    ``work_dir`` (the lists are written there)."""
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = work_dir
    os.makedirs(work_dir, exist_ok=True)
    for loader, part in ((cfg.train_dataloader, 'train'), (cfg.test_dataloader, 'test')):
        loader.dataset.ann_file = _write_lines(osp.join(work_dir, f'{part}.txt'), split[part])
        loader.dataset.data_prefix = dict(img_path='', seg_map_path='')
    cfg.resume = osp.isfile(osp.join(work_dir, 'last_checkpoint'))
    return cfg


def run_split(cfg: Config) -> Dict[str, float]:
    """Train, then test; the test metrics."""
    from mmseg.registry import RUNNERS
    runner = RUNNERS.build(cfg)
    runner.train()
    return {key: float(value) for key, value in runner.test().items()}


def summarize(results: Dict[str, Dict[str, float]], metric: str = 'mIoU') -> Dict:
    """Both protocols' figures, by name."""
    random = [r[metric] for name, r in results.items() if name.startswith('random')]
    summary = dict(metric=metric, fixed_split=results.get('fixed', {}).get(metric))
    if random:
        summary['random_splits'] = dict(mean=float(np.mean(random)),
                                        std=float(np.std(random)), n=len(random),
                                        values=random)
    return summary


def image_forwards(cfg: Config, num_train: int, num_test: int) -> int:
    """Images the frozen half sees in one split run without a store: every training image of
    every iteration, then every test image (the pixel ensemble: each image once per run, as
    the reference codes extract per run)."""
    if cfg.get('pixel_ensemble'):
        return num_train + num_test
    return cfg.train_cfg.max_iters * cfg.train_dataloader.batch_size + num_test


def frozen_cost(store: FeatureStore, forwards_without_store: int, extracted: int) -> Dict:
    """The frozen half's FLOPs and passes for the protocol, with the store (each image once;
    ``extracted`` of them by this run, the others reused) and without it (every image of
    every step); an image costs what extracting it cost, the same source call."""
    cost = store.manifest['cost']
    flops = cost['flops_per_image']
    return dict(
        per_image=dict(flops=flops, passes={k: v / cost['images']
                                            for k, v in cost['passes'].items()}),
        with_store=dict(image_forwards=len(store), flops=len(store) * flops,
                        extracted_this_run=extracted),
        without_store=dict(image_forwards=forwards_without_store,
                           flops=forwards_without_store * flops),
        flops_ratio=forwards_without_store / len(store))


def stored_config(cfg: Config, features: str, device='cpu') -> tuple:
    """Extract (or reuse) the store of every train and test image in ``features``; ``cfg``
    with its backbone reading from it, the store and how many images this call extracted."""
    backbone = cfg.model.backbone
    source, seed = backbone.get('source', {}), backbone.get('noise_seed', 0)
    before = finished_images(features)
    store = extract_features(source, dataset_images(cfg, ('train', 'test')), features, seed,
                             device=device)
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone.source = dict(type='StoredSource', store=features, source=source,
                                     noise_seed=seed)
    return cfg, store, len(store) - before


def run_protocol(cfg: Config, num_random: int, work_dir: str, seed: int = 0,
                 metric: str = 'mIoU', features: Optional[str] = '', device='cpu') -> Dict:
    """Every split of :func:`make_splits`, resumable; writes and returns
    ``<work_dir>/label_scarce.json``. ``features``: the store folder (default
    ``<work_dir>/features``), or None to run the frozen half on every training step (fresh
    noise each step, as a plain MMSeg run)."""
    store = extracted = None
    if features is None and cfg.get('pixel_ensemble'):
        raise ValueError('The pixel ensemble (the config\'s pixel_ensemble) trains on stored '
                         'features: run without --no-store, or set pixel_ensemble=None to '
                         'train the MMSeg segmentor instead.')
    if features is not None:
        cfg, store, extracted = stored_config(cfg, features or osp.join(work_dir, 'features'),
                                              device)
    dataset = cfg.train_dataloader.dataset
    suffix = dataset.get('img_suffix', '.png')
    train = list_images(dataset.data_root, dataset.data_prefix['img_path'], suffix)
    test_set = cfg.test_dataloader.dataset
    test = list_images(test_set.data_root, test_set.data_prefix['img_path'], suffix)
    sizes = cfg.get('fixed_split') or {}
    splits = make_splits(train, test, num_random, seed, sizes.get('num_train'),
                         sizes.get('num_test'))
    results = {}
    for index, split in enumerate(splits, 1):
        folder = osp.join(work_dir, split['name'])
        done = osp.join(folder, 'result.json')
        if osp.isfile(done):
            with open(done) as f:
                results[split['name']] = json.load(f)
            print(f"[label_scarce] split {index}/{len(splits)} ({split['name']}): done "
                  f"before, {metric} {results[split['name']].get(metric)}")
            continue
        print(f"[label_scarce] split {index}/{len(splits)} ({split['name']}): "
              f"{len(split['train'])} training, {len(split['test'])} test images")
        split_cfg = split_config(cfg, split, folder)
        results[split['name']] = run_pixel_split(split_cfg, store, folder, device) \
            if cfg.get('pixel_ensemble') else run_split(split_cfg)
        with atomic_file(done) as tmp, open(tmp, 'w') as f:
            json.dump(results[split['name']], f, indent=1)
    report = dict(splits=results, summary=summarize(results, metric), seed=seed,
                  protocols=dict(
                      fixed_split="DDPM-segmentation's: the first num_train sorted training "
                      'and num_test sorted test images',
                      random_splits="the GATE authors': mean and std over random re-splits "
                      'of those train+test images with the same sizes'),
                  split_lists={s['name']: dict(train=s['train'], test=s['test'])
                               for s in splits})
    if store is not None:
        forwards = sum(image_forwards(cfg, len(s['train']), len(s['test'])) for s in splits)
        report['features'] = store.folder
        report['frozen_half'] = frozen_cost(store, forwards, extracted)
    with atomic_file(osp.join(work_dir, 'label_scarce.json')) as tmp, open(tmp, 'w') as f:
        json.dump(report, f, indent=1)
    return report
