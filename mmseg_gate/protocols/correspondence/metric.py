"""PCK@alpha per image and per bounding box, per keypoint and per pair, per category.
"""
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .matching import match


def pck(pred: torch.Tensor, pair: dict, alpha: float = 0.1) -> Dict[str, np.ndarray]:
    """Correct predictions within alpha of the target image ('img') or bounding box
    ('bbox') size."""
    gt = torch.tensor(pair['trg_kps'], dtype=torch.float32)
    distance = (pred.float() - gt).norm(dim=1).numpy()
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


def evaluate(pairs: List[dict], features: Callable[[str], torch.Tensor], alpha: float = 0.1,
             progress: bool = True, matching: Optional[Dict] = None
             ) -> Tuple[Dict, List[torch.Tensor]]:
    """PCK over ``pairs`` with ``features(path) -> (C, h, w)`` and :func:`~.matching.match`
    options ``matching``; also the predictions."""
    from tqdm import tqdm
    correct, predictions = [], []
    for pair in tqdm(pairs, desc='matching', unit='pair', disable=not progress):
        pred = match(features(pair['src_path']), features(pair['trg_path']),
                     torch.tensor(pair['src_kps'], dtype=torch.float32),
                     tuple(pair['src_imsize'][:2]), tuple(pair['trg_imsize'][:2]),
                     **(matching or {}))
        predictions.append(pred)
        correct.append((pair['category'], pck(pred, pair, alpha)))
    return summarize_pck(correct), predictions
