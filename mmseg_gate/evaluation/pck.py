"""PCK@alpha for semantic correspondence as an MMEngine metric (registered in MMSeg's
``METRICS``): per image (alpha x max(H, W) of the target) and per bounding box (alpha x
max(h, w) of its box), per keypoint over all pairs and per pair, per category and overall.
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from mmengine.evaluator import BaseMetric

from mmseg.registry import METRICS


def pck(pred: torch.Tensor, pair: dict, alpha: float = 0.1) -> Dict[str, np.ndarray]:
    """Correct predictions within alpha of the target image ('img') or bounding box
    ('bbox') size. In float64, as Diffusion Hyperfeatures' ``compute_pck`` (numpy) compares:
    in float32 a prediction just beyond the threshold can round onto it."""
    gt = np.asarray(pair['trg_kps'], dtype=np.float64)
    distance = np.linalg.norm(torch.as_tensor(pred).double().numpy() - gt, axis=-1)
    width, height = pair['trg_imsize'][:2]
    x1, y1, x2, y2 = pair['trg_bndbox']
    return dict(img=distance <= alpha * max(width, height),
                bbox=distance <= alpha * max(x2 - x1, y2 - y1))


def summarize_pck(correct: List[Tuple[str, Dict[str, np.ndarray]]]) -> Dict:
    """Per category and overall: PCK per keypoint (all keypoints of all pairs) and per pair
    (mean of the pairs' PCK), for 'img' and 'bbox', in percent."""
    def stats(items):
        out = {}
        for kind in ('img', 'bbox'):
            flags = [c[kind] for _, c in items]
            out[f'pck_{kind}'] = 100 * float(np.concatenate(flags).mean())
            out[f'pck_{kind}_per_pair'] = 100 * float(np.mean([f.mean() for f in flags]))
        out['pairs'] = len(items)
        out['keypoints'] = int(sum(len(c['img']) for _, c in items))
        return out

    categories = sorted({category for category, _ in correct})
    return dict(overall=stats(correct),
                per_category={c: stats([x for x in correct if x[0] == c]) for c in categories})


@METRICS.register_module()
class PCKMetric(BaseMetric):
    """PCK@``alpha`` of predicted keypoints. Each data sample is a pair dict (``trg_kps``,
    ``trg_imsize``, ``trg_bndbox``, ``category``) with its predictions ``pred_kps`` ([x, y]
    target pixels); results are ``pck_img``, ``pck_bbox``, their ``_per_pair`` means, and
    the same per category as ``<category>/pck_img``..., in percent."""

    default_prefix = 'spair'

    def __init__(self, alpha: float = 0.1, collect_device: str = 'cpu',
                 prefix: str = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.alpha = alpha

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            self.results.append((sample['category'],
                                 pck(torch.as_tensor(sample['pred_kps']), sample, self.alpha)))

    def compute_metrics(self, results: List[Tuple[str, Dict]]) -> Dict[str, float]:
        summary = summarize_pck(results)
        flat = {k: v for k, v in summary['overall'].items()}
        for category, stats in summary['per_category'].items():
            flat.update({f'{category}/{k}': v for k, v in stats.items()})
        return flat
