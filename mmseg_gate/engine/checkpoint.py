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

The hand-written training loops (correspondence, LoRA) keep their resume state in one format,
:func:`save_training_state` / :func:`load_training_state`: plain data, written atomically,
refused with a clear message when it belongs to another version, kind of run or settings.
"""
import json
import os.path as osp
import pickle
from collections import OrderedDict
from typing import Any, Callable, Dict, Tuple, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

from ..fileio import atomic_file

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


TRAINING_STATE_FORMAT = 'mmseg_gate.training_state/1'


def settings_json(settings: Dict[str, Any]) -> str:
    """``settings`` as the JSON text a training state records (keys sorted, tuples as lists),
    so that equal settings give equal text."""
    return json.dumps(settings, sort_keys=True)


def save_training_state(path: str, kind: str, settings: Dict[str, Any], step: int,
                        state: Dict[str, Any]) -> None:
    """Write the resume state of a hand-written training loop: ``{'format', 'kind',
    'settings', 'step', 'state'}``, plain data only (checked before anything is written, so a
    state that could not be resumed is never saved), atomically (a kill leaves the previous
    file). ``kind`` names the loop ('correspondence', 'lora'); ``settings`` (JSON-able) are
    those that must not change across a resume."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TypeError(f'the step of a training state is a non-negative int, got {step!r}.')
    checkpoint = dict(format=TRAINING_STATE_FORMAT, kind=kind,
                      settings=settings_json(settings), step=step, state=state)
    check_plain(checkpoint, f'training state {osp.basename(path)!r}')
    with atomic_file(path) as tmp:
        torch.save(checkpoint, tmp)


def load_training_state(path: str, kind: str,
                        settings: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
    """``(step, state)`` of a file :func:`save_training_state` wrote for a ``kind`` run with
    these ``settings``; a ``ValueError`` naming the file, the problem and the fix otherwise."""
    checkpoint = read_checkpoint(path)
    found = checkpoint.get('format') if isinstance(checkpoint, dict) else None
    if found != TRAINING_STATE_FORMAT:
        written_by = f'format {found!r}' if isinstance(found, str) else \
            'no format: written by an older mmseg_gate version or another program'
        raise ValueError(f"'{path}' is not a training state this version can resume (expected "
                         f'format {TRAINING_STATE_FORMAT!r}, it has {written_by}). Remove it to '
                         'train from scratch, or finish that run with the version that wrote it.')
    if checkpoint.get('kind') != kind:
        raise ValueError(f"'{path}' is the training state of a {checkpoint.get('kind')!r} run, "
                         f'not of this {kind!r} run; use another work dir, or remove it to '
                         'train from scratch.')
    try:
        theirs = json.loads(checkpoint['settings'])
        step, state = checkpoint['step'], checkpoint['state']
        if not (isinstance(theirs, dict) and isinstance(step, int) and isinstance(state, dict)):
            raise TypeError('settings, step or state of the wrong type')
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"'{path}' is a damaged training state ({err}); remove it to train "
                         'from scratch.') from err
    ours = json.loads(settings_json(settings))
    changed = [key for key in sorted(set(theirs) | set(ours))
               if key not in theirs or key not in ours or theirs[key] != ours[key]]
    if changed:
        def shown(table: dict, key: str) -> str:
            return repr(table[key]) if key in table else 'unset'

        differences = '; '.join(f'{key}: {shown(theirs, key)} there, {shown(ours, key)} now'
                                for key in changed)
        raise ValueError(f"'{path}' is the training state of a run with other settings "
                         f'({differences}); rerun with the settings it was written with, or '
                         'remove it to train from scratch.')
    return step, state


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
