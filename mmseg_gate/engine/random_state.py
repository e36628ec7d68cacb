"""Every random stream a training step draws from, as plain data for a checkpoint.

A resumed run equals an uninterrupted one only if it continues each stream where the
checkpoint left it: torch's global generator (dropout, DataLoader seeds), numpy's and Python's
(data augmentation), CUDA's, and the generators that modules keep for themselves (GATE's
training noise). Modules take part by defining ``noise_generator_state()`` and
``set_noise_generator_state(state)``.
"""
import random
from typing import Dict

import numpy as np
import torch
from torch import nn


def _modules_with_generators(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules()
            if callable(getattr(module, 'noise_generator_state', None))}


def capture_random_state(model: nn.Module) -> dict:
    """The state of every random stream, in tensors, numbers and strings only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt_state, gauss = random.getstate()
    state = dict(
        torch=torch.get_rng_state(),
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                   has_gauss=int(has_gauss), cached_gaussian=float(cached)),
        python=dict(version=version, state=list(mt_state), gauss=gauss),
        modules={name: module.noise_generator_state()
                 for name, module in _modules_with_generators(model).items()})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(model: nn.Module, state: dict, host: bool = True) -> None:
    """Set the random streams to ``state`` (from :func:`capture_random_state`): all of them,
    or with ``host=False`` only torch's, CUDA's and the modules' (the model's streams; numpy's
    and Python's drive data augmentation, which resuming replays by itself)."""
    torch.set_rng_state(state['torch'])
    if host:
        numpy = state['numpy']
        np.random.set_state((numpy['kind'], numpy['keys'].numpy().astype(np.uint32),
                             numpy['pos'], numpy['has_gauss'], numpy['cached_gaussian']))
        python = state['python']
        random.setstate((python['version'], tuple(python['state']), python['gauss']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    modules = _modules_with_generators(model)
    for name, generator_state in state['modules'].items():
        if name in modules and generator_state is not None:
            modules[name].set_noise_generator_state(generator_state)
