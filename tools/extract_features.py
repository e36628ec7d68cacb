"""Extract a config's frozen features once into a store, for training many times on them.

    python tools/extract_features.py CONFIG --out DIR [--split train test]
        [--images FOLDER [--image-size S]] [--dtype float16] [--device cuda] [--limit N]
        [--random-init [--arch sd15] [--lora-rank 64]] [--cfg-options key=value ...]
    bash tools/dist_extract.sh CONFIG NUM_PROCS --out DIR ...     # one share per process

CONFIG names what to extract: an MMSeg config's ``model.backbone.source`` over the images of
its ``--split`` dataloaders (each through its own pipeline: the pixels training sees), a
correspondence config's ``source`` over its pairs' images, or either's source over a folder
(``--images``). Every variant's features are stored at their native resolution with the
fixed noise seed, one safetensors shard per image plus ``manifest.json``. A rerun skips the
finished images (an interrupted run resumes); a store from other weights, taps, timestep,
seeds or images is refused, naming the fields. ``--random-init`` extracts with random
weights of the real architecture (no download): the cost figures are real.
"""
import argparse
import json
import os
import tempfile

import mmseg_gate  # noqa: F401  (registers the plugin)
from mmengine.config import Config, DictAction
from mmengine.dist import get_rank

from mmseg_gate.engine.cli import read_config, run_tool
from mmseg_gate.engine.devices import default_device
from mmseg_gate.engine.distributed import init_process_group
from mmseg_gate.store import extract_features
from mmseg_gate.protocols.extraction import extraction_plan
from mmseg_gate.testing.random_models import write_random_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    parser = argparse.ArgumentParser(description='Extract frozen features into a store')
    parser.add_argument('config')
    parser.add_argument('--out', required=True, help='the store folder')
    parser.add_argument('--split', nargs='+', help='dataloaders of an MMSeg config '
                        '(default: train test) or splits of a correspondence config '
                        '(default: all it reads: train val test, and test_full)')
    parser.add_argument('--images', help='a folder of images instead of the datasets')
    parser.add_argument('--image-size', type=int, help='with --images: resize to SxS')
    parser.add_argument('--dtype', default='float16', choices=['float16', 'float32'])
    parser.add_argument('--device', default=default_device())
    parser.add_argument('--limit', type=int, help='only the first N images')
    parser.add_argument('--random-init', action='store_true',
                        help='random weights of the known architecture (no download)')
    parser.add_argument('--arch', default='sd15', help='architecture for --random-init')
    parser.add_argument('--lora-rank', type=int, default=64)
    parser.add_argument('--lora-config', default=os.path.join(ROOT, 'configs', 'lora',
                                                              '_base_.py'))
    parser.add_argument('--no-progress', action='store_true')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    parser.add_argument('--launcher', choices=['none', 'pytorch'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = read_config(args.config, args.cfg_options)
    init_process_group(args.launcher)
    source, seed, images = extraction_plan(cfg, args.split, args.images, args.image_size)
    with tempfile.TemporaryDirectory(prefix='gate-extract-') as tmp:
        if args.random_init:
            targets = Config.fromfile(args.lora_config).target_modules
            write_random_models(source, tmp, args.arch, args.lora_rank, targets)
        store = extract_features(source, images.limited(args.limit), args.out, seed,
                                 args.dtype, args.device, not args.no_progress)
    if get_rank() == 0:
        cost = store.manifest['cost']
        print(f"[extract_features] {args.out}: {len(store)} images complete; "
              f"{cost['flops_per_image'] / 1e9:.2f} GFLOPs per image; passes for all "
              f"{cost['images']}: {json.dumps(cost['passes'])}")


if __name__ == '__main__':
    run_tool('extract_features', main)
