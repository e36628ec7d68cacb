"""Semantic correspondence on SPair-71k with GATE features (PCK@0.1).

    python tools/correspondence.py train CONFIG      # train the aggregation network, keep
                                                     # the best on val, then test it
    python tools/correspondence.py test CONFIG [--checkpoint best.safetensors]
    python tools/correspondence.py zero-shot CONFIG  # raw features, no training (DIFT-style)
        [--work-dir DIR] [--features DIR | --no-store] [--device cuda] [--no-progress]
        [--cfg-options key=value ...]
    bash tools/dist_correspondence.sh CONFIG NUM_PROCS [ARGS...]   # train on N processes

Every image's frozen features are extracted once into a feature store (``--features``,
default ``<work_dir>/features``: every train, val and test image) that later runs of any
mode reuse; ``--no-store`` computes them in memory instead.

Writes to the work dir: ``best.safetensors``, ``training.json`` (every validation, the
selected step and the paper's best-over-validations figures) and, while training,
``last_checkpoint.pt`` (a killed run resumes from it exactly); ``results_<mode>.json`` (PCK
per keypoint and per pair, per image and per bbox, per category and overall, for every
held-out split, with the paper's figures in train mode) and ``matches_<mode>.png`` (a few
test pairs: source | target, lines green where correct).
"""
import argparse
import os

from mmengine.config import DictAction

import mmseg_gate  # noqa: F401
from mmseg_gate.engine.cli import read_config, run_tool
from mmseg_gate.engine.devices import default_device
from mmseg_gate.engine.distributed import init_process_group
from mmseg_gate.protocols.correspondence.run import MODES, run_correspondence


def parse_args():
    parser = argparse.ArgumentParser(description='Semantic correspondence (SPair-71k)')
    parser.add_argument('mode', choices=MODES)
    parser.add_argument('config')
    parser.add_argument('--checkpoint', help="test: the aggregator (default: the work dir's "
                        'best.safetensors)')
    parser.add_argument('--work-dir')
    parser.add_argument('--device', default=default_device())
    parser.add_argument('--features', default='',
                        help='the feature store (default: <work_dir>/features)')
    parser.add_argument('--no-store', action='store_true',
                        help='compute the features in memory instead of a store')
    parser.add_argument('--no-progress', action='store_true')
    parser.add_argument('--launcher', choices=['none', 'pytorch'], default='none',
                        help='pytorch: one of torchrun\'s processes '
                        '(tools/dist_correspondence.sh)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = read_config(args.config, args.cfg_options)
    if init_process_group(args.launcher) and args.device == 'cuda':
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"  # one GPU per process
    report = run_correspondence(cfg, args.mode, args.work_dir or cfg.work_dir, args.device,
                                args.checkpoint, args.config, not args.no_progress,
                                None if args.no_store else args.features)
    if not report:
        return  # another process reports
    alpha = report['alpha']
    if 'paper' in report:  # train mode
        paper = report['paper']
        print(f"[correspondence] the paper's way (best over {paper['validations']} validations "
              f"on {paper['split']}, each taken on its own): PCK@{alpha} img "
              f"{paper['pck_img']:.2f} (step {paper['pck_img_step']}), bbox "
              f"{paper['pck_bbox']:.2f} (step {paper['pck_bbox_step']})")
    if 'model_selection' in report:
        chosen = report['model_selection']
        print(f"[correspondence] selected on {chosen['split']}: step {chosen['step']} (bbox "
              f"{chosen['pck_bbox']:.2f}), tested on held-out pairs:")
    for split, overall in report['tests'].items():
        print(f"[correspondence] {args.mode} on {split} ({overall['pairs']} pairs): "
              f"PCK@{alpha} per keypoint: img {overall['pck_img']:.2f}, bbox "
              f"{overall['pck_bbox']:.2f}; per pair: img {overall['pck_img_per_pair']:.2f}, "
              f"bbox {overall['pck_bbox_per_pair']:.2f}")
    print(f"[correspondence] wrote {report['results_file']} and {report['picture']}")


if __name__ == '__main__':
    run_tool('correspondence', main)
