"""Training the aggregation network on keypoint pairs, validating as it goes.

The GATE authors' loop (``correspondence_gate/task-corres.py``): one pair per step, each epoch
a fresh permutation of the training pairs (2 epochs of 5,000 steps), AdamW 5e-4 / 0.01, the
symmetric keypoint loss at temperature 0.07, their sparsity term with its random-walking
lambda, a validation every 500 steps. Both ways of reporting come from the validations kept
in ``training.json``: the paper's (the best per-image and the best per-bbox PCK over all
validations, taken independently) and a selection (the step with the best per-bbox PCK,
whose weights are ``best.safetensors``, tested on held-out pairs afterwards).

Validation runs the network in eval mode (running BatchNorm statistics, no dropout), or with
``val_mode='train'`` as the authors' does: in train mode, each pair's two images in one batch
(BatchNorm over the pair, dropout active), so every validation is a noisy one. Either way
validation leaves the network and every random stream as it found them.

The run is resumable exactly: every validation before the last also writes
``last_checkpoint.pt`` (the one training-state format of
:func:`~mmseg_gate.engine.checkpoint.save_training_state`: plain tensors and numbers, the
network, the optimizer, the torch and sparsity-walk random states, the step, the history, the
run's settings), atomically; a rerun with the same settings continues from it and ends bitwise
where an uninterrupted run ends.
A finished run removes it, so a later run trains anew (keeping a better earlier model).

Under ``torchrun`` (``tools/dist_correspondence.sh``) every process trains on its own pair
of each step (the step's batch is one pair per process, gradients averaged by
``DistributedDataParallel``); rank 0 validates and writes, the random states of every rank
are kept in the checkpoint.
"""
import json
import os
import os.path as osp
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.dist import all_gather_object, barrier, get_dist_info
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ...engine.checkpoint import load_training_state, save_training_state
from ...fileio import atomic_file
from ...models.amalgamation import SparsityWalk, sparsity_loss
from ...models.correspondence import save_aggregator
from .features import FeatureCache, batch_features
from .matching import keypoint_loss, to_grid
from .metric import evaluate

LAST = 'last_checkpoint.pt'
KIND = 'correspondence'  # of the training state in LAST
VAL_MODES = ('eval', 'train')


def earlier_best(work_dir: str) -> Optional[Dict]:
    """The validation score of the ``best.safetensors`` an earlier, finished run left in
    ``work_dir`` (None if there is none), so that a rerun never replaces a better model with a
    worse one."""
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


def pair_order(num_pairs: int, steps: int, seed: int,
               steps_per_epoch: Optional[int] = None) -> np.ndarray:
    """The training pair of every step: per epoch a fresh permutation of the pairs (its first
    ``steps_per_epoch``; default: all), epochs one after another."""
    rng, order = np.random.default_rng(seed), []
    per_epoch = min(steps_per_epoch or num_pairs, num_pairs)
    while len(order) < steps:
        order.extend(rng.permutation(num_pairs)[:per_epoch])
    return np.asarray(order[:steps])


def paper_report(history: List[Dict]) -> Dict:
    """The paper's figures: the best per-image and the best per-bbox validation PCK over all
    validations, each taken on its own (they may come from different steps)."""
    img = max(history, key=lambda h: h['pck_img'])
    bbox = max(history, key=lambda h: h['pck_bbox'])
    return dict(pck_img=img['pck_img'], pck_img_step=img['step'], pck_bbox=bbox['pck_bbox'],
                pck_bbox_step=bbox['step'], validations=len(history))


def _save_last(path: str, settings: Dict, aggregator, optimizer, walk: SparsityWalk,
               step: int, history: List[Dict], best: Optional[Dict],
               rng_states: List[torch.Tensor]) -> None:
    state = dict(model=aggregator.state_dict(), optimizer=optimizer.state_dict(),
                 torch_rng=torch.stack(rng_states), walk=dict(
                     rng=walk.rng.bit_generator.state, value=walk.value, base=walk.base,
                     best_drop=walk.best_drop, last_loss=walk.last_loss),
                 history=json.dumps(history), best=json.dumps(best))
    save_training_state(path, KIND, settings, step, state)


def _load_last(path: str, settings: Dict, aggregator, optimizer, walk: SparsityWalk):
    step, state = load_training_state(path, KIND, settings)
    try:
        aggregator.load_state_dict(state['model'], strict=True)
        optimizer.load_state_dict(state['optimizer'])
        rank, world = get_dist_info()
        if state['torch_rng'].shape[0] != world:
            raise ValueError(f"it was written by {state['torch_rng'].shape[0]} processes, "
                             f'this run has {world}')
        torch.set_rng_state(state['torch_rng'][rank])
        walk.rng.bit_generator.state = state['walk']['rng']
        for key in ('value', 'base', 'best_drop', 'last_loss'):
            setattr(walk, key, state['walk'][key])
        return step, json.loads(state['history']), json.loads(state['best'])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"'{path}' is not a training checkpoint of this config ({err}); "
                         'remove it to train from scratch.') from err


def train_aggregator(aggregator: nn.Module, cache: FeatureCache, train_pairs: List[dict],
                     val_pairs: List[dict], work_dir: str, steps: int = 10000,
                     lr: float = 5e-4, weight_decay: float = 0.01, temperature: float = 0.07,
                     sparsity: Union[float, str] = 0.0, val_every: int = 500,
                     alpha: float = 0.1, seed: int = 0, steps_per_epoch: Optional[int] = None,
                     matching: Optional[Dict] = None, val_mode: str = 'eval',
                     val_offset: int = 0, val_last: bool = True,
                     progress: bool = True) -> Dict:
    """Train on keypoint pairs (one pair per step, AdamW), validate every ``val_every``
    steps and at the end, keep the step with the best validation PCK@alpha per bbox
    (``best.safetensors``; one an earlier finished run left is replaced only by a better
    model). ``sparsity``: a fixed lambda (0: none) or ``'random_walk'`` (the authors').
    ``matching``: :func:`~.matching.match` options for validation and the keypoint grid
    (``pixel_centres``). ``val_mode``: 'eval' or 'train' (the authors'; module docstring).
    Validations come after steps ``val_offset + k * val_every`` (k >= 1) and, with
    ``val_last``, after the last (the authors': offset 1, no last -- their 0-based step
    counter validates after 501, 1001, ... updates). Resumes from ``last_checkpoint.pt``
    when there is one."""
    if val_mode not in VAL_MODES:
        raise ValueError(f'train.val_mode must be one of {VAL_MODES}, got {val_mode!r}.')
    if not val_last and steps < val_offset + val_every:
        raise ValueError(f'train: {steps} steps with val_every={val_every}, '
                         f'val_offset={val_offset} and val_last=False never validate (nothing '
                         'to select): train longer or set val_last=True.')
    matching = dict(matching or {})
    centres = matching.get('pixel_centres', True)
    device = next(aggregator.parameters()).device
    rank, world = get_dist_info()
    optimizer = torch.optim.AdamW(aggregator.parameters(), lr=lr, weight_decay=weight_decay)
    # Step s trains rank r on pair order[s * world + r].
    order = pair_order(len(train_pairs), steps * world, seed, steps_per_epoch)
    torch.manual_seed(seed + rank)  # each process its own dropout
    walk = SparsityWalk(np.random.default_rng(seed))
    last = osp.join(work_dir, LAST)
    settings = dict(steps=steps, lr=lr, weight_decay=weight_decay, temperature=temperature,
                    sparsity=sparsity, val_every=val_every, seed=seed,
                    steps_per_epoch=steps_per_epoch, train_pairs=len(train_pairs),
                    val_pairs=len(val_pairs), processes=world, val_mode=val_mode,
                    val_offset=val_offset, val_last=val_last)
    start, history, best = 0, [], None
    resume = osp.isfile(last)
    barrier()  # every rank has looked before rank 0 may write
    if resume:
        start, history, best = _load_last(last, settings, aggregator, optimizer, walk)
        if rank == 0:
            print(f'[correspondence] resuming {work_dir} from step {start}')
    else:
        best = earlier_best(work_dir)
        if best is not None and rank == 0:
            print(f"[correspondence] {work_dir} holds best.safetensors of an earlier run (val "
                  f"PCK bbox {best['pck_bbox']:.2f} at step {best['step']}): kept unless this "
                  'run beats it')
    model = aggregator if world == 1 else DistributedDataParallel(
        aggregator, device_ids=[device.index] if device.type == 'cuda' else None)
    bar = tqdm(range(start + 1, steps + 1), desc='training', unit='step',
               disable=not progress or rank != 0, initial=start, total=steps)
    for step in bar:
        pair = train_pairs[order[(step - 1) * world + rank]]
        aggregator.train()
        feats = batch_features(cache(pair['src_path']), cache(pair['trg_path']))
        out = model([{k: v.to(device) for k, v in f.items()} for f in feats]).float()
        grid = out.shape[2:]
        loss = keypoint_loss(
            out[0], out[1],
            to_grid(torch.tensor(pair['src_kps'], device=device), pair['src_imsize'][:2], grid,
                    centres),
            to_grid(torch.tensor(pair['trg_kps'], device=device), pair['trg_imsize'][:2], grid,
                    centres),
            temperature)
        lam = walk.value if sparsity == 'random_walk' else float(sparsity)
        total = loss + sparsity_loss(aggregator.sparsity(), loss, lam) if lam else loss
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        value = loss.detach().clone()
        if world > 1:  # one lambda for every process: the walk follows the mean loss
            dist.all_reduce(value)
            value /= world
        walk.update(step - 1, value.item())
        bar.set_postfix(loss=f'{value.item():.3f}')
        scheduled = step > val_offset and (step - val_offset) % val_every == 0
        if scheduled or (val_last and step == steps):
            rng = torch.get_rng_state()  # validation draws nothing from the training stream
            rng_states = all_gather_object(rng) if world > 1 else [rng]
            if rank == 0:
                score = validate(aggregator, cache, val_pairs, alpha, matching, val_mode)
                torch.set_rng_state(rng)
                history.append(dict(step=step, loss=value.item(), sparsity_lambda=lam,
                                    **score))
                if best is None or score['pck_bbox'] > best['pck_bbox']:
                    best = dict(step=step, **score)
                    save_aggregator(aggregator, osp.join(work_dir, 'best.safetensors'))
                with atomic_file(osp.join(work_dir, 'training.json')) as tmp, \
                        open(tmp, 'w') as f:
                    json.dump(dict(best=best, paper=paper_report(history), history=history),
                              f, indent=1)
                if step < steps:  # a finished run leaves nothing to resume
                    _save_last(last, settings, aggregator, optimizer, walk, step, history,
                               best, rng_states)
                print(f"[correspondence] step {step}: val PCK@{alpha} bbox "
                      f"{score['pck_bbox']:.2f}, img {score['pck_img']:.2f} (best "
                      f"{best['pck_bbox']:.2f} at step {best['step']})")
            barrier()
    if rank == 0 and osp.isfile(last):
        os.remove(last)
    barrier()
    return dict(best=best, paper=paper_report(history) if history else None, history=history)


def aggregated(aggregator: nn.Module, cache: FeatureCache) -> Callable[[str], torch.Tensor]:
    """``path -> (C, h, w)``: the aggregator's features of an image (eval mode)."""
    device = next(aggregator.parameters()).device

    def features(path: str) -> torch.Tensor:
        aggregator.eval()
        with torch.no_grad():
            return aggregator([{k: v.to(device) for k, v in f.items()}
                               for f in cache(path)])[0]
    return features


def in_train_mode(aggregator: nn.Module, cache: FeatureCache
                  ) -> Callable[[str, str], Tuple[torch.Tensor, torch.Tensor]]:
    """``(source path, target path) -> two (C, h, w)``: the pair's features in one batch,
    the network in train mode (the authors' validation: BatchNorm over the pair, dropout
    active), without gradients."""
    device = next(aggregator.parameters()).device

    def features(source: str, target: str):
        aggregator.train()
        with torch.no_grad():
            out = aggregator([{k: v.to(device) for k, v in f.items()}
                              for f in batch_features(cache(source), cache(target))])
        return out[0], out[1]
    return features


def validate(aggregator, cache, pairs, alpha, matching: Optional[Dict] = None,
             val_mode: str = 'eval') -> Dict[str, float]:
    """PCK on ``pairs`` in ``val_mode`` ('eval' or 'train'); the network's buffers (BatchNorm
    running statistics) are as before afterwards."""
    if val_mode == 'eval':
        results, _ = evaluate(pairs, aggregated(aggregator, cache), alpha, progress=False,
                              matching=matching)
        return results['overall']
    buffers = {name: value.clone() for name, value in aggregator.named_buffers()}
    try:
        results, _ = evaluate(pairs, None, alpha, progress=False, matching=matching,
                              pair_features=in_train_mode(aggregator, cache))
    finally:
        for name, value in aggregator.named_buffers():
            value.copy_(buffers[name])
    return results['overall']
