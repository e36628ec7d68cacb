"""Training the aggregation network on keypoint pairs, selecting the best on validation.
"""
import json
import os.path as osp
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ...fileio import atomic_file
from ...models.amalgamation import sparsity_loss
from .features import FeatureCache, batch_features
from .matching import keypoint_loss, to_grid
from .metric import evaluate
from .model import CorrespondenceAggregator, save_aggregator


def earlier_best(work_dir: str) -> Optional[Dict]:
    """The validation score of the ``best.safetensors`` an earlier run left in ``work_dir``
    (None if there is none), so that a rerun never replaces a better model with a worse one."""
    log = osp.join(work_dir, 'training.json')
    if not (osp.isfile(log) and osp.isfile(osp.join(work_dir, 'best.safetensors'))):
        return None
    try:
        with open(log, encoding='utf-8') as f:
            best = json.load(f)['best']
        float(best['pck_bbox']), int(best['step'])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"'{log}' is not the training log of tools/correspondence.py ({err}); "
                         'remove it, or the whole work dir, to train from scratch.') from err
    return dict(best, earlier_run=True)


def train_aggregator(aggregator: CorrespondenceAggregator, cache: FeatureCache,
                     train_pairs: List[dict], val_pairs: List[dict], work_dir: str,
                     steps: int = 10000, lr: float = 5e-4, weight_decay: float = 0.01,
                     temperature: float = 0.07, sparsity: float = 0.0, val_every: int = 500,
                     alpha: float = 0.1, seed: int = 0, progress: bool = True) -> Dict:
    """Train on keypoint pairs (one pair per step, AdamW), validate every ``val_every``
    steps and keep the best by validation PCK@alpha per bbox (``best.safetensors``). A
    ``best.safetensors`` an earlier run left is replaced only by a better model."""

    device = next(aggregator.parameters()).device
    optimizer = torch.optim.AdamW(aggregator.parameters(), lr=lr, weight_decay=weight_decay)
    order = np.random.default_rng(seed).permutation(len(train_pairs))
    best, history = earlier_best(work_dir), []
    if best is not None:
        print(f"[correspondence] {work_dir} holds best.safetensors of an earlier run (val "
              f"PCK bbox {best['pck_bbox']:.2f} at step {best['step']}): kept unless this run "
              'beats it')
    bar = tqdm(range(1, steps + 1), desc='training', unit='step', disable=not progress)
    for step in bar:
        pair = train_pairs[order[(step - 1) % len(order)]]
        aggregator.train()
        feats = batch_features(cache(pair['src_path']), cache(pair['trg_path']))
        out = aggregator([{k: v.to(device) for k, v in f.items()} for f in feats]).float()
        grid = out.shape[2:]
        loss = keypoint_loss(
            out[0], out[1],
            to_grid(torch.tensor(pair['src_kps'], device=device), pair['src_imsize'][:2], grid),
            to_grid(torch.tensor(pair['trg_kps'], device=device), pair['trg_imsize'][:2], grid),
            temperature)
        total = loss + sparsity_loss(aggregator.sparsity(), loss, sparsity) if sparsity \
            else loss
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        bar.set_postfix(loss=f'{loss.item():.3f}')
        if step % val_every == 0 or step == steps:
            score = validate(aggregator, cache, val_pairs, alpha)
            history.append(dict(step=step, loss=loss.item(), **score))
            if best is None or score['pck_bbox'] > best['pck_bbox']:
                best = dict(step=step, **score)
                save_aggregator(aggregator, osp.join(work_dir, 'best.safetensors'))
            with atomic_file(osp.join(work_dir, 'training.json')) as tmp, open(tmp, 'w') as f:
                json.dump(dict(best=best, history=history), f, indent=1)
            print(f"[correspondence] step {step}: val PCK@{alpha} bbox {score['pck_bbox']:.2f}"
                  f", img {score['pck_img']:.2f} (best {best['pck_bbox']:.2f} at step "
                  f"{best['step']})")
    return dict(best=best, history=history)


def aggregated(aggregator: nn.Module, cache: FeatureCache) -> Callable[[str], torch.Tensor]:
    """``path -> (C, h, w)``: the aggregator's features of an image (eval mode)."""
    device = next(aggregator.parameters()).device

    def features(path: str) -> torch.Tensor:
        aggregator.eval()
        with torch.no_grad():
            return aggregator([{k: v.to(device) for k, v in f.items()}
                               for f in cache(path)])[0]
    return features


def validate(aggregator, cache, pairs, alpha) -> Dict[str, float]:
    results, _ = evaluate(pairs, aggregated(aggregator, cache), alpha, progress=False)
    return results['overall']
