"""The label-scarce protocol (DDPM-segmentation's benchmark): train and test a config on the
official split and on random re-splits of train+test, and report the mean and spread.

    python tools/label_scarce.py CONFIG [--splits 5] [--seed 0] [--work-dir DIR]
        [--cfg-options key=value ...]

Each split runs in ``<work_dir>/<split>/`` (``official``, ``random0`` ...); a rerun skips the
finished splits and resumes an unfinished one. Results: ``<work_dir>/label_scarce.json``.
"""
import argparse

import mmseg_gate  # noqa: F401  (registers the plugin)
from mmseg_gate.engine.cli import add_common_args, load_config
from mmseg_gate.protocols.label_scarce import run_protocol


def parse_args():
    parser = argparse.ArgumentParser(description='Label-scarce segmentation protocol')
    parser.add_argument('config')
    parser.add_argument('--splits', type=int, default=5,
                        help='random re-splits of train+test (besides the official split)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the first re-split')
    add_common_args(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = load_config(args)
    report = run_protocol(cfg, args.splits, cfg.work_dir, args.seed)
    summary = report['summary']
    print(f"[label_scarce] {summary['metric']}: official split {summary['official']:.2f}")
    if 'random_mean' in summary:
        print(f"[label_scarce] {summary['metric']} over {summary['random_n']} random splits: "
              f"{summary['random_mean']:.2f} ± {summary['random_std']:.2f}")
    print(f'[label_scarce] wrote {cfg.work_dir}/label_scarce.json')


if __name__ == '__main__':
    main()
