"""Draw a config's training samples (after its pipeline) with their labels.

    python tools/browse_dataset.py CONFIG --output-dir DIR [--not-show] [--cfg-options ...]

MMSeg 1.2.2's own ``tools/analysis_tools/browse_dataset.py`` hands its visualizer a
non-contiguous view of the image, and OpenCV (4.x and 5.x alike) refuses to draw the class
labels on the mask built from it ("Layout of the output array img is incompatible with
cv::Mat", open-mmlab/mmsegmentation#3405). This is the same tool with a contiguous image and
the plugin loaded.
"""
import argparse
import os.path as osp

import numpy as np
from mmengine.config import DictAction
from mmengine.utils import ProgressBar

import mmseg_gate  # noqa: F401  (registers the plugin's datasets and models)
from mmseg.registry import DATASETS, VISUALIZERS
from mmseg.utils import register_all_modules
from mmseg_gate.engine.cli import read_config, run_tool


def parse_args():
    parser = argparse.ArgumentParser(description='Browse a dataset')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--output-dir', default=None, help='where to write the pictures')
    parser.add_argument('--not-show', action='store_true', help='do not open windows')
    parser.add_argument('--show-interval', type=float, default=2, help='seconds per picture')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = read_config(args.config, args.cfg_options)
    register_all_modules()
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    visualizer = VISUALIZERS.build(cfg.visualizer)
    visualizer.dataset_meta = dataset.metainfo
    progress = ProgressBar(len(dataset))
    for item in dataset:
        image = np.ascontiguousarray(item['inputs'].permute(1, 2, 0).numpy()[..., ::-1])
        name = osp.basename(item['data_samples'].img_path)
        visualizer.add_datasample(
            name=name, image=image, data_sample=item['data_samples'].numpy(), draw_gt=True,
            draw_pred=False, wait_time=args.show_interval, show=not args.not_show,
            out_file=osp.join(args.output_dir, name) if args.output_dir else None)
        progress.update()


if __name__ == '__main__':
    run_tool('browse_dataset', main)
