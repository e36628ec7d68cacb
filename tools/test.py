"""Test (and evaluate) a checkpoint: ``python tools/test.py CONFIG CHECKPOINT [--out DIR]``.

MMSeg's tools/test.py with ``mmseg_gate`` imported. For a leaderboard submission, write the
predictions without evaluating, e.g. ADE20K test images:
``--cfg-options test_evaluator.format_only=True test_evaluator.output_dir=work_dirs/submit``
(see docs/segmentation.md).
"""
import argparse

import mmseg_gate  # noqa: F401  (registers GATEBackbone)
from mmseg.registry import RUNNERS
from mmseg_gate.engine.cli import add_common_args, load_config, run_tool


def parse_args():
    parser = argparse.ArgumentParser(description='MMSeg test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='directory to save the predicted label maps (PNG)')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir', help='directory to save painted predictions')
    parser.add_argument('--wait-time', type=float, default=2, help='interval of show (s)')
    parser.add_argument('--tta', action='store_true', help='test time augmentation')
    add_common_args(parser)
    return parser.parse_args()


def enable_visualization(cfg, args):
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise RuntimeError('--show/--show-dir need a SegVisualizationHook in default_hooks: '
                           "visualization=dict(type='SegVisualizationHook').")
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        cfg.visualizer['save_dir'] = args.show_dir


def main():
    args = parse_args()
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        enable_visualization(cfg, args)
    if args.tta:
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out is not None:
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    RUNNERS.build(cfg).test()


if __name__ == '__main__':
    run_tool('test', main)
