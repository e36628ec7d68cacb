"""Train a segmentor: ``python tools/train.py CONFIG [--work-dir DIR] [--resume] [--amp]``.

MMSeg's tools/train.py with ``mmseg_gate`` imported (GATEBackbone registered) and run by
``GATERunner`` unless the config names another runner (checkpoints that are plain data,
written atomically, loaded strictly, resumed exactly), ``--launcher pytorch`` working without
CUDA.
"""
import argparse
import logging

from mmengine.logging import print_log

import mmseg_gate  # noqa: F401  (registers GATEBackbone)
from mmseg.registry import RUNNERS
from mmseg_gate.engine.cli import add_common_args, load_config, run_tool


def parse_args():
    parser = argparse.ArgumentParser(description='Train a segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--resume', action='store_true',
                        help='resume from the latest checkpoint in the work_dir')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision for the trainable parts')
    add_common_args(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = load_config(args)
    if args.amp:
        if cfg.optim_wrapper.type == 'AmpOptimWrapper':
            print_log('AMP training is already enabled in your config.', logger='current',
                      level=logging.WARNING)
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    cfg.resume = args.resume
    RUNNERS.build(cfg).train()


if __name__ == '__main__':
    run_tool('train', main)
