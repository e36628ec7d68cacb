"""The label-scarce protocol (DDPM-segmentation's benchmark): train and test a config on the
benchmark's fixed split (DDPM-segmentation's protocol) and on random re-splits of its
train+test (the GATE authors' protocol: mean and spread), and report both.

    python tools/label_scarce.py CONFIG [--splits 5] [--seed 0] [--work-dir DIR]
        [--features DIR | --no-store] [--device cuda] [--cfg-options key=value ...]

The frozen half runs once: every train and test image is extracted into a feature store
(``--features``, default ``<work_dir>/features``; a rerun reuses it, a store from other
settings is refused) and every split trains on it. ``--no-store`` computes the features on
every step instead (fresh noise each step).

Each split runs in ``<work_dir>/<split>/`` (``fixed``, ``random0`` ...); a rerun skips the
finished splits and resumes an unfinished one. Results: ``<work_dir>/label_scarce.json``.
"""
import argparse

import mmseg_gate  # noqa: F401  (registers the plugin)
from mmseg_gate.engine.cli import add_common_args, load_config, run_tool
from mmseg_gate.engine.devices import default_device
from mmseg_gate.protocols.label_scarce import run_protocol


def parse_args():
    parser = argparse.ArgumentParser(description='Label-scarce segmentation protocol')
    parser.add_argument('config')
    parser.add_argument('--splits', type=int, default=5,
                        help='random re-splits of train+test (besides the fixed split)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the first re-split')
    parser.add_argument('--features', default='',
                        help='the feature store (default: <work_dir>/features)')
    parser.add_argument('--no-store', action='store_true',
                        help='run the frozen half on every step instead of a store')
    parser.add_argument('--device', default=default_device(),
                        help='where the store is extracted and the pixel ensemble trains')
    add_common_args(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = load_config(args)
    report = run_protocol(cfg, args.splits, cfg.work_dir, args.seed,
                          features=None if args.no_store else args.features,
                          device=args.device)
    summary = report['summary']
    print(f"[label_scarce] {summary['metric']}, fixed split (DDPM-segmentation's protocol): "
          f"{summary['fixed_split']:.2f}")
    if 'random_splits' in summary:
        random = summary['random_splits']
        print(f"[label_scarce] {summary['metric']}, {random['n']} random re-splits (the GATE "
              f"authors' protocol): {random['mean']:.2f} ± {random['std']:.2f}")
    cost = report.get('frozen_half')
    if cost:
        print(f"[label_scarce] frozen half: {cost['with_store']['flops'] / 1e12:.3f} TFLOPs "
              f"for the {cost['with_store']['image_forwards']} stored images "
              f"({cost['with_store']['extracted_this_run']} extracted by this run); "
              f"{cost['without_store']['flops'] / 1e12:.3f} TFLOPs without the store "
              f"({cost['without_store']['image_forwards']} image forwards): "
              f"{cost['flops_ratio']:.0f}x")
    print(f'[label_scarce] wrote {cfg.work_dir}/label_scarce.json')


if __name__ == '__main__':
    run_tool('label_scarce', main)
