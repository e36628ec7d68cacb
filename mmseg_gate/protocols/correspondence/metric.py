"""Matching every pair of a split and scoring it with :class:`PCKMetric` (the formulas live
in ``mmseg_gate/evaluation/pck.py``).
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ...evaluation.pck import PCKMetric, summarize_pck
from .matching import match


def evaluate(pairs: List[dict], features: Optional[Callable[[str], torch.Tensor]],
             alpha: float = 0.1, progress: bool = True, matching: Optional[Dict] = None,
             pair_features: Optional[Callable[[str, str], Tuple[torch.Tensor, torch.Tensor]]]
             = None) -> Tuple[Dict, List[torch.Tensor]]:
    """PCK over ``pairs`` with ``features(path) -> (C, h, w)`` (or ``pair_features(source
    path, target path)`` -> both maps, when a pair's features depend on each other) and
    :func:`~.matching.match` options ``matching``; also the predictions."""
    from tqdm import tqdm
    if pair_features is None:
        def pair_features(source: str, target: str):
            return features(source), features(target)
    metric, predictions = PCKMetric(alpha), []
    for pair in tqdm(pairs, desc='matching', unit='pair', disable=not progress):
        pred = match(*pair_features(pair['src_path'], pair['trg_path']),
                     torch.tensor(pair['src_kps'], dtype=torch.float32),
                     tuple(pair['src_imsize'][:2]), tuple(pair['trg_imsize'][:2]),
                     **(matching or {}))
        predictions.append(pred)
        metric.process(None, [dict(pair, pred_kps=pred)])
    return summarize_pck(metric.results), predictions
