"""Checkpoints that hold plain data only, read without unpickling anything else.

A checkpoint file is a pickle. Read with ``torch.load(weights_only=True)`` it can only rebuild
tensors and plain containers; anything else is refused. MMEngine's checkpoints do not pass that
test: the message hub holds ``HistoryBuffer`` objects (numpy arrays, plus a table of functions
that ``HistoryBuffer.__setstate__`` merges into a class-wide table), and ``Runner.resume``
executes ``meta['config']`` as Python. Allow-listing those classes would let a crafted file
replace the table or lay an object dtype over raw bytes, so instead:

- :func:`plain_message_hub` writes the message hub as tensors, numbers and strings, and
  :func:`restore_message_hub` rebuilds the ``HistoryBuffer`` objects from that data with their
  constructor (no ``__setstate__``);
- :func:`read_checkpoint` loads with ``weights_only=True`` and nothing allow-listed, and says
  clearly what to do with a file that is not plain data;
- :func:`install_safe_local_loader` makes MMEngine's own local-file loader (used by
  ``load_from``, ``init_cfg=dict(type='Pretrained')`` and ``mmseg.apis.init_model``) read that
  way too, whatever the MMEngine version's default.
"""
import os.path as osp
import pickle
from collections import OrderedDict
from typing import Any, Callable, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

MapLocation = Union[str, torch.device, Callable, None]
_HISTORY = '__history_buffer__'


class UnsafeCheckpointError(ValueError):
    """A checkpoint that needs more than plain data to be read."""


def read_checkpoint(filename: str, map_location: MapLocation = 'cpu') -> Any:
    """Load ``filename`` with ``torch.load(weights_only=True)``; clear errors otherwise."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"Checkpoint '{filename}' does not exist.")
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"Checkpoint '{filename}' is not plain data: it holds pickled Python objects "
            f'({_first_line(err)}). It is not loaded, because unpickling such objects can run '
            'code or corrupt the process. Checkpoints written by mmseg_gate (tools/train.py, '
            "runner_type='GATERunner') hold tensors, numbers and strings only; one from stock "
            'MMEngine or mmseg_gate 0.1 must be re-saved as plain data in an environment you '
            'trust, e.g. `torch.save({"state_dict": torch.load(f, weights_only=False)'
            '["state_dict"]}, out)`.') from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"Checkpoint '{filename}' cannot be read ({_first_line(err)}): the file is "
            'truncated or not a PyTorch checkpoint. mmseg_gate writes checkpoints atomically, '
            'so an interrupted save never leaves one behind; resume from the previous '
            'checkpoint or re-create this one.') from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_local(filename: str, map_location: MapLocation) -> Any:
    return read_checkpoint(filename, map_location)


def install_safe_local_loader() -> None:
    """Route MMEngine's loading of local checkpoint files through :func:`read_checkpoint`."""
    CheckpointLoader.register_scheme(prefixes='', loader=_load_local, force=True)


def to_plain(value: Any) -> Any:
    """``value`` with numpy arrays as tensors and numpy scalars as Python numbers."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, OrderedDict):
        return OrderedDict((k, to_plain(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    return value


_PLAIN_LEAVES = (str, bytes, int, float, bool, type(None), torch.Tensor, torch.Size,
                 torch.dtype, torch.device)


def check_plain(value: Any, where: str = 'checkpoint') -> None:
    """Raise if ``value`` holds anything ``torch.load(weights_only=True)`` would refuse, so
    that a checkpoint that could not be resumed is never written."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain(key, f'{where} key')
            check_plain(item, f'{where}[{key!r}]')
    elif isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        for i, item in enumerate(value):
            check_plain(item, f'{where}[{i}]')
    elif not isinstance(value, _PLAIN_LEAVES):
        raise TypeError(f'{where} is a {type(value).__module__}.{type(value).__qualname__}; '
                        'checkpoints hold tensors, numbers, strings, lists and dicts only, so '
                        'that loading them cannot run code. Store it as plain data.')


def plain_message_hub(state: dict) -> dict:
    """A ``MessageHub.state_dict()`` with each ``HistoryBuffer`` written as its data."""
    scalars = OrderedDict()
    for key, buffer in state['log_scalars'].items():
        logs, counts = buffer.data
        scalars[key] = {_HISTORY: True, 'log_history': to_plain(logs),
                        'count_history': to_plain(counts), 'max_length': buffer.max_length}
    return dict(log_scalars=scalars, runtime_info=to_plain(state['runtime_info']),
                resumed_keys=dict(state['resumed_keys']))


def restore_message_hub(state: dict) -> dict:
    """Inverse of :func:`plain_message_hub`: ``HistoryBuffer`` objects built from data."""
    scalars = OrderedDict()
    for key, value in state['log_scalars'].items():
        if not (isinstance(value, dict) and value.get(_HISTORY)):
            raise ValueError(f"Message hub entry '{key}' is not a plain history buffer.")
        scalars[key] = HistoryBuffer(value['log_history'].numpy(),
                                     value['count_history'].numpy(),
                                     int(value['max_length']))
    return dict(state, log_scalars=scalars)


def is_plain_message_hub(state: dict) -> bool:
    return all(isinstance(v, dict) and v.get(_HISTORY)
               for v in state.get('log_scalars', {}).values())
