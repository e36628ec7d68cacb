"""Semantic correspondence on SPair-71k with GATE features (PCK@0.1).

    python tools/correspondence.py train CONFIG      # train the aggregation network, keep
                                                     # the best on val, then test it
    python tools/correspondence.py test CONFIG [--checkpoint best.safetensors]
    python tools/correspondence.py zero-shot CONFIG  # raw features, no training (DIFT-style)
        [--work-dir DIR] [--device cuda] [--no-progress] [--cfg-options key=value ...]

Writes to the work dir: ``best.safetensors`` and ``training.json`` (train), ``results_<mode>.json``
(PCK per keypoint and per pair, per image and per bbox, per category and overall, with the
split it comes from) and ``matches_<mode>.png`` (a few test pairs: source | target, lines green
where correct).
"""
import argparse
import json
import os
import os.path as osp

import torch
from mmengine.config import Config, DictAction

import mmseg_gate  # noqa: F401
from mmseg_gate import GATEFeatureExtractor
from mmseg_gate.analysis.pictures import save_png
from mmseg_gate.datasets.spair import load_pairs
from mmseg_gate.engine.devices import default_device
from mmseg_gate.fileio import atomic_file
from mmseg_gate.protocols.correspondence import (CorrespondenceAggregator, FeatureCache,
                                                 aggregated, draw_matches, evaluate,
                                                 load_aggregator, raw_features,
                                                 train_aggregator)


def parse_args():
    parser = argparse.ArgumentParser(description='Semantic correspondence (SPair-71k)')
    parser.add_argument('mode', choices=['train', 'test', 'zero-shot'])
    parser.add_argument('config')
    parser.add_argument('--checkpoint', help="test: the aggregator (default: the work dir's "
                        'best.safetensors)')
    parser.add_argument('--work-dir')
    parser.add_argument('--device', default=default_device())
    parser.add_argument('--no-progress', action='store_true')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args()


def main():
    args = parse_args()
    if not osp.isfile(args.config):
        raise SystemExit(f"Config '{args.config}' does not exist.")
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    work_dir = args.work_dir or cfg.work_dir
    os.makedirs(work_dir, exist_ok=True)
    torch.manual_seed(cfg.train.get('seed', 0))
    data, progress = cfg.data, not args.no_progress
    device = torch.device(args.device)
    extractor = GATEFeatureExtractor(**cfg.extractor).to(device)
    cache = FeatureCache(extractor, data.image_size, cfg.train.get('seed', 0),
                         cfg.get('feature_cache', 256))
    test_pairs = load_pairs(data.root, data.test_split,
                            per_category=data.get('test_per_category'))
    if args.mode == 'zero-shot':
        names = [f['name'] for f in extractor.feature_info]
        features = lambda path: raw_features(cache(path), names)[0]  # noqa: E731
        source = 'raw features'
    else:
        aggregator = CorrespondenceAggregator(extractor.feature_info, len(extractor.variants),
                                              **cfg.aggregator).to(device)
        best = osp.join(work_dir, 'best.safetensors')
        if args.mode == 'train':
            train_pairs = load_pairs(data.root, data.train_split)
            val_pairs = load_pairs(data.root, data.val_split,
                                   per_category=data.get('val_per_category'))
            settings = {k: v for k, v in cfg.train.items()}
            train_aggregator(aggregator, cache, train_pairs, val_pairs, work_dir,
                             alpha=cfg.alpha, progress=progress, **settings)
        load_aggregator(aggregator, args.checkpoint or best)
        features = aggregated(aggregator, cache)
        source = f'aggregator {args.checkpoint or best}'
    results, predictions = evaluate(test_pairs, features, cfg.alpha, progress)
    report = dict(mode=args.mode, config=args.config, split=data.test_split, features=source,
                  alpha=cfg.alpha, **results)
    if args.mode == 'train':
        with open(osp.join(work_dir, 'training.json')) as f:
            report['model_selection'] = dict(split=data.val_split, **json.load(f)['best'])
    out = osp.join(work_dir, f"results_{args.mode.replace('-', '_')}.json")
    with atomic_file(out) as tmp, open(tmp, 'w') as f:
        json.dump(report, f, indent=1)
    shown = cfg.get('num_match_pictures', 6)
    picture = save_png(draw_matches(test_pairs[:shown], predictions[:shown], cfg.alpha),
                       osp.join(work_dir, f"matches_{args.mode.replace('-', '_')}.png"))
    overall = results['overall']
    print(f"[correspondence] {args.mode} on {data.test_split} ({overall['pairs']} pairs): "
          f"PCK@{cfg.alpha} per keypoint: img {overall['pck_img']:.2f}, bbox "
          f"{overall['pck_bbox']:.2f}; per pair: img {overall['pck_img_per_pair']:.2f}, bbox "
          f"{overall['pck_bbox_per_pair']:.2f}")
    print(f'[correspondence] wrote {out} and {picture}')


if __name__ == '__main__':
    main()
