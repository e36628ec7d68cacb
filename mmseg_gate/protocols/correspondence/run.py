"""One correspondence run from a config: train (then test the best), test, or zero-shot;
what ``tools/correspondence.py`` runs."""
import json
import os
import os.path as osp
from typing import Dict, Optional

import torch

from ...analysis.pictures import save_png
from ...fileio import atomic_file
from ...sources import StoredSource, build_source
from ...store import FeatureStore, extract_features
from ...store.writer import finished_images
from .features import FeatureCache, protocol_pairs, raw_features, spair_images
from .metric import evaluate
from .model import CorrespondenceAggregator, load_aggregator
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
    cache = FeatureCache(source, data.image_size, device, seed, cfg.get('feature_cache', 256))
    test_pairs = pairs['test']
    torch.manual_seed(seed)  # after loading (which may draw): the same start with a store
    if mode == 'zero-shot':
        names = [f['module'] for f in source.feature_info]
        embed = lambda path: raw_features(cache(path), names)[0]  # noqa: E731
        used = 'raw features'
    else:
        aggregator = CorrespondenceAggregator(source.feature_info,
                                              **cfg.aggregator).to(device)
        best = osp.join(work_dir, 'best.safetensors')
        if mode == 'train':
            train_aggregator(aggregator, cache, pairs['train'], pairs['val'], work_dir,
                             alpha=cfg.alpha, progress=progress, **cfg.train)
        load_aggregator(aggregator, checkpoint or best)
        embed = aggregated(aggregator, cache)
        used = f'aggregator {checkpoint or best}'
    results, predictions = evaluate(test_pairs, embed, cfg.alpha, progress)
    report = dict(mode=mode, config=config, split=data.test_split, features=used,
                  alpha=cfg.alpha, **results)
    if store is not None:
        report['feature_store'] = dict(folder=store.folder, **store.manifest['cost'])
        report['frozen_half'] = frozen_cost(store, len(store) - before, cache)
    if mode == 'train':
        with open(osp.join(work_dir, 'training.json')) as f:
            report['model_selection'] = dict(split=data.val_split, **json.load(f)['best'])
    name = mode.replace('-', '_')
    report['results_file'] = osp.join(work_dir, f'results_{name}.json')
    with atomic_file(report['results_file']) as tmp, open(tmp, 'w') as f:
        json.dump(report, f, indent=1)
    shown = cfg.get('num_match_pictures', 6)
    report['picture'] = save_png(draw_matches(test_pairs[:shown], predictions[:shown],
                                              cfg.alpha),
                                 osp.join(work_dir, f'matches_{name}.png'))
    return report
