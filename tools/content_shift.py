"""The GATE guideline as a tool: measure and show how much each variant of a config
suppresses content shift.

    python tools/content_shift.py CONFIG IMAGE [IMAGE ...] [--out DIR]
        [--variants 0 1 2] [--timesteps 50 200] [--anchor-timestep 500] [--baseline 0]
        [--taps ...] [--size 512] [--checkpoint CKPT] [--no-reconstruct]
        [--strength 0.8] [--steps 50] [--guidance-scale 7.5] [--device cuda] [--seed 0]
        [--cfg-options key=value ...]

Writes to ``--out`` (default ``work_dirs/content_shift/<config>``):

- ``content_shift.json`` and ``content_shift.md``: per tap, timestep and variant, the
  suppression score ``(diff_anchor - diff) / diff_anchor`` (mean +- std over the images), with
  the reference at t = 0 (the clean latent) and the anchor at ``--anchor-timestep``, both of
  the ``--baseline`` variant (``mmseg_gate/analysis/content_shift.py``);
- ``features_<image>.png``: per tap (the config's, plus an attention tap), the input and each
  variant's feature map at the config's timestep as a joint PCA -> RGB;
- ``reconstruction_<image>.png``: the input and each variant's img2img reconstruction at high
  strength (diffusers' pipelines; ``--no-reconstruct`` skips them);
- with ``--checkpoint`` (a trained segmentor of this config): ``amalgamation_weights.png``, the
  mean weight the amalgamation gives each variant per level on these images.

The work is ``mmseg_gate.analysis.guideline.run_guideline``.
"""
import argparse
import os.path as osp

from mmengine.config import DictAction

import mmseg_gate  # noqa: F401  (registers the plugin)
from mmseg_gate.analysis.guideline import run_guideline
from mmseg_gate.engine.cli import read_config, run_tool
from mmseg_gate.engine.devices import default_device


def parse_args():
    parser = argparse.ArgumentParser(description='Measure and show content shift')
    parser.add_argument('config')
    parser.add_argument('images', nargs='+')
    parser.add_argument('--out', help='output folder')
    parser.add_argument('--variants', type=int, nargs='+', help="indices of the config's "
                        'variants to compare (default: all)')
    parser.add_argument('--timesteps', type=int, nargs='+', help='timesteps to measure at '
                        "(default: the config's)")
    parser.add_argument('--anchor-timestep', type=int, default=500,
                        help='the anchor: the baseline variant at this timestep')
    parser.add_argument('--baseline', type=int, default=0,
                        help='variant whose t=0 feature is the reference (default: the first)')
    parser.add_argument('--taps', nargs='+', help="UNet modules to read (default: the config's "
                        'plus a self-attention layer of the last tapped block)')
    parser.add_argument('--size', type=int, default=512, help='images are resized and centre '
                        'cropped to SIZE x SIZE')
    parser.add_argument('--checkpoint', help='trained segmentor: plot its amalgamation weights')
    parser.add_argument('--no-reconstruct', action='store_true')
    parser.add_argument('--strength', type=float, default=0.8)
    parser.add_argument('--steps', type=int, default=50)
    parser.add_argument('--guidance-scale', type=float, default=7.5)
    parser.add_argument('--device', default=default_device())
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-progress', action='store_true')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args()


def main():
    args = parse_args()
    out = args.out or osp.join('work_dirs', 'content_shift',
                               osp.splitext(osp.basename(args.config))[0])
    cfg = read_config(args.config, args.cfg_options)
    table = run_guideline(
        cfg, args.config, args.images, out, args.variants, args.timesteps,
        args.anchor_timestep, args.baseline, args.taps, args.size, args.checkpoint,
        not args.no_reconstruct, args.strength, args.steps, args.guidance_scale,
        args.device, args.seed, not args.no_progress)
    print(f'[content_shift] wrote {out}/content_shift.json, content_shift.md and pictures')
    print(table)


if __name__ == '__main__':
    run_tool('content_shift', main)
