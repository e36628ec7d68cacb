"""One correspondence run from a config: train (then test the best), test, or zero-shot;
what ``tools/correspondence.py`` runs."""
import json
import os
import os.path as osp
from typing import Dict, Optional

import torch
from mmengine.dist import get_dist_info

from ...analysis.pictures import save_png
from ...datasets.spair import DHF_FILES
from ...fileio import atomic_file
from ...models.correspondence import build_aggregator, load_aggregator
from ...sources import build_source
from ...store import FeatureStore, StoredSource, extract_features
from ...store.writer import finished_images
from .features import FeatureCache, image_reader, protocol_pairs, raw_features, spair_images
from .metric import evaluate
from .pictures import draw_matches
from .training import aggregated, train_aggregator

MODES = ('train', 'test', 'zero-shot')


def frozen_cost(store: FeatureStore, extracted: int, cache: FeatureCache) -> Dict:
    """The frozen half's FLOPs for this run with the store (the images it extracted) and
    without it (a source call per cache miss of the same lookups)."""
    flops = store.manifest['cost']['flops_per_image']
    return dict(flops_per_image=flops, image_requests=cache.requests,
                with_store=dict(image_forwards=extracted, flops=extracted * flops),
                without_store=dict(image_forwards=cache.misses, flops=cache.misses * flops))


def _split_name(data, split: str) -> str:
    """The split as its files call it (``val-360``, ``test-360``, ``test``, ...)."""
    if data.get('split_files', 'spair') != 'dhf':
        return data.get(f'{split}_split', split)
    if split == 'test_full':
        return 'test'
    files = dict(DHF_FILES, **(data.get('dhf_files') or {}))
    return files[split].replace('spair_71k_', '').replace('.json', '')


def run_correspondence(cfg, mode: str, work_dir: str, device='cpu',
                       checkpoint: Optional[str] = None, config: str = '',
                       progress: bool = True, features: Optional[str] = '') -> Dict:
    """Run ``mode`` of the config ``cfg`` in ``work_dir``; writes ``results_<mode>.json`` and
    ``matches_<mode>.png`` there and returns the report.

    ``features``: the store of every train, val and test image (default
    ``<work_dir>/features``; extracted by the first run of any mode, reused by the others),
    or None to compute each image's features in memory."""
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}.')
    os.makedirs(work_dir, exist_ok=True)
    seed = cfg.train.get('seed', 0)
    data, device = cfg.data, torch.device(device)
    pairs, store = protocol_pairs(data), None
    if features is None:
        source = build_source(cfg.source).to(device)
    else:
        folder = features or osp.join(work_dir, 'features')
        before = finished_images(folder)
        store = extract_features(cfg.source, spair_images(data, pairs=pairs), folder, seed,
                                 device=device, progress=progress)
        source = StoredSource(store).to(device)
    cache = FeatureCache(source, data.image_size, device, seed, cfg.get('feature_cache', 256),
                         read=image_reader(data))
    matching = cfg.get('matching')
    torch.manual_seed(seed)  # after loading (which may draw): the same start with a store
    if mode == 'zero-shot':
        names = [f['module'] for f in source.feature_info]
        weights = cfg.get('zero_shot', {}).get('weights')
        embed = lambda path: raw_features(cache(path), names, weights)[0]  # noqa: E731
        used = 'raw features'
    else:
        aggregator = build_aggregator(cfg.aggregator, source.feature_info).to(device)
        best = osp.join(work_dir, 'best.safetensors')
        if mode == 'train':
            train_aggregator(aggregator, cache, pairs['train'], pairs['val'], work_dir,
                             alpha=cfg.alpha, progress=progress, matching=matching,
                             **cfg.train)
    if get_dist_info()[0] != 0:
        return {}  # under torchrun, rank 0 tests and reports
    if mode != 'zero-shot':
        load_aggregator(aggregator, checkpoint or best)
        embed = aggregated(aggregator, cache)
        used = f'aggregator {checkpoint or best}'
    # Every held-out split the config reads ('test'; with DHF's files also SPair's whole test
    # split, 'test_full'): the first is the report's headline.
    tests = {name: evaluate(split, embed, cfg.alpha, progress, matching)
             for name, split in pairs.items() if name.startswith('test')}
    results, predictions = tests['test']
    report = dict(mode=mode, config=config, split=_split_name(data, 'test'), features=used,
                  alpha=cfg.alpha, matching=matching or {}, **results,
                  tests={_split_name(data, name): r[0]['overall']
                         for name, r in tests.items()})
    if store is not None:
        report['feature_store'] = dict(folder=store.folder, **store.manifest['cost'])
        report['frozen_half'] = frozen_cost(store, len(store) - before, cache)
    if mode == 'train':
        with open(osp.join(work_dir, 'training.json')) as f:
            log = json.load(f)
        # The paper's way: the best val PCK per image and per bbox over all validations.
        if log.get('paper'):
            report['paper'] = dict(split=_split_name(data, 'val'), **log['paper'])
        # Selected on val, reported on the held-out splits above.
        report['model_selection'] = dict(split=_split_name(data, 'val'), **log['best'])
    test_pairs = pairs['test']
    name = mode.replace('-', '_')
    report['results_file'] = osp.join(work_dir, f'results_{name}.json')
    with atomic_file(report['results_file']) as tmp, open(tmp, 'w') as f:
        json.dump(report, f, indent=1)
    shown = cfg.get('num_match_pictures', 6)
    report['picture'] = save_png(draw_matches(test_pairs[:shown], predictions[:shown],
                                              cfg.alpha),
                                 osp.join(work_dir, f'matches_{name}.png'))
    return report
