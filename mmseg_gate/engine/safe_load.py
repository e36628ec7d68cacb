"""Resuming MMEngine checkpoints with torch >= 2.6, which loads with ``weights_only=True``.

An MMEngine checkpoint holds the Runner's ``MessageHub`` (``HistoryBuffer`` objects wrapping
numpy arrays); the safe unpickler rejects those classes, so ``--resume`` fails with an
UnpicklingError. Allow-listing exactly these classes keeps safe loading on for everything else.
"""
import numpy as np
import torch
from mmengine.logging import HistoryBuffer


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    _reconstruct = core.multiarray._reconstruct
    dtype_classes = [type(np.dtype(name)) for name in
                     ('float64', 'float32', 'float16', 'int64', 'int32', 'int8', 'uint8',
                      'bool')]
    return [_reconstruct, np.ndarray, np.dtype, *dtype_classes]


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read MMEngine's own checkpoint contents."""
    if hasattr(torch.serialization, 'add_safe_globals'):
        torch.serialization.add_safe_globals([HistoryBuffer, *_numpy_globals()])
