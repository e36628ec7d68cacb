"""DDPM-segmentation's mIoU (``compute_iou`` in its ``src/pixel_classifier.py``) as an
MMEngine metric, for numbers comparable with the label-scarce benchmark's.

It differs from MMSeg's ``IoUMetric`` in two ways that move the numbers:

- every class is scored: a class absent from both the predictions and the labels of the
  whole test set has IoU 0 (MMSeg's leaves it out of the mean as NaN);
- pixels whose label is ``ignore_index`` still count in the union of the class predicted
  there (MMSeg's drops them from every count). Bedroom-28's background is such a label: the
  benchmark never trains on it and never scores it, but a background pixel predicted as
  "bed" lowers the IoU of "bed".

Intersections and unions are summed over the test set, then IoU = I / (1e-8 + U) per class,
averaged over the classes, as ``compute_iou`` does. Like ``compute_iou``, an ``ignore_index``
inside the class range (DDPM-segmentation's own ``bedroom_28/ddpm.json``: 29 classes,
``ignore_label`` 0) is no class: it is left out of the mean, not averaged in as a zero.
"""
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log

from mmseg.registry import METRICS


@METRICS.register_module()
class BenchmarkIoUMetric(BaseMetric):
    """The label-scarce benchmark's mIoU (see the module docstring).

    Args:
        ignore_index (int): the label value that is not a class (255 after MMSeg's
            ``reduce_zero_label``, which turns Bedroom-28's background 0 into 255).
        collect_device (str): MMEngine's. Default: 'cpu'.
        prefix (str, optional): MMEngine's metric-name prefix.
    """

    default_prefix: Optional[str] = None

    def __init__(self, ignore_index: int = 255, collect_device: str = 'cpu',
                 prefix: Optional[str] = None, **kwargs):
        super().__init__(collect_device=collect_device, prefix=prefix, **kwargs)
        self.ignore_index = ignore_index

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        num_classes = len(self.dataset_meta['classes'])
        for sample in data_samples:
            pred = sample['pred_sem_seg']['data'].squeeze().long().cpu()
            label = sample['gt_sem_seg']['data'].squeeze().long().cpu()
            self.results.append(intersection_and_union(pred, label, num_classes,
                                                       self.ignore_index))

    def compute_metrics(self, results: List) -> Dict[str, float]:
        intersection = sum(r[0] for r in results)
        union = sum(r[1] for r in results)
        iou = (intersection / (1e-8 + union)).tolist()
        scored = [k for k in range(len(iou)) if k != self.ignore_index]
        names = self.dataset_meta['classes']
        print_log('benchmark IoU per class: ' + ', '.join(
            f'{names[k]} {100 * iou[k]:.2f}' for k in scored), logger='current')
        return dict(mIoU=float(100 * np.mean([iou[k] for k in scored])))


def intersection_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                           ignore_index: int):
    """Per class, the pixels predicted and labelled k (intersection) and the pixels
    predicted or labelled k (union), a pixel labelled ``ignore_index`` counting in the union
    of the class predicted there; float64 (num_classes,) each."""
    if pred.shape != label.shape:
        raise ValueError(f'BenchmarkIoUMetric: prediction {tuple(pred.shape)} and label '
                         f'{tuple(label.shape)} differ in size; predict at the label size.')
    predicted = torch.bincount(pred[(pred >= 0) & (pred < num_classes)],
                               minlength=num_classes)
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    labelled = torch.bincount(label[valid], minlength=num_classes)
    both = torch.bincount(label[valid & (pred == label)], minlength=num_classes)
    return both.double(), (predicted + labelled - both).double()
