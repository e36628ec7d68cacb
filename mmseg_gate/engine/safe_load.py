"""Resuming MMEngine checkpoints with torch >= 2.6, which loads with ``weights_only=True``.

An MMEngine checkpoint holds the Runner's ``MessageHub``: ``HistoryBuffer`` objects wrapping
numpy arrays, whose pickled state also carries the class's table of statistics functions
(pickled as ``getattr(HistoryBuffer, 'min')``). The safe unpickler rejects all three, so
``--resume`` fails with an UnpicklingError. Rather than turning safe loading off (or allowing
``getattr``, which would let a checkpoint inject functions into that class-level table):

- checkpoints are written without that table (it is rebuilt from code when loading anyway);
- ``HistoryBuffer`` and numpy's array/scalar reconstruction are allow-listed for loading.
"""
import copyreg

import numpy as np
import torch
from mmengine.logging import HistoryBuffer


def _reduce_history_buffer(buffer: HistoryBuffer):
    state = {k: v for k, v in buffer.__dict__.items() if k != 'statistics_methods'}
    return HistoryBuffer, (), state


def _numpy_globals() -> list:
    core = getattr(np, '_core', None) or np.core  # numpy 2 renamed numpy.core
    dtype_classes = [type(np.dtype(name)) for name in
                     ('float64', 'float32', 'float16', 'int64', 'int32', 'int8', 'uint8',
                      'bool')]
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype,
            *dtype_classes]


def allow_mmengine_checkpoints() -> None:
    """Make MMEngine checkpoints load with ``torch.load(weights_only=True)``."""
    copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
    if hasattr(torch.serialization, 'add_safe_globals'):
        torch.serialization.add_safe_globals([HistoryBuffer, *_numpy_globals()])
