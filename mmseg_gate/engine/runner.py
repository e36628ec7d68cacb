"""MMEngine's Runner with checkpoints that are safe to load, complete, exact and atomic.

``GATERunner`` is MMEngine's ``Runner`` with these changes; select it with
``runner_type = 'GATERunner'`` (the shipped configs do, and ``tools/train.py``/``test.py`` use it
for any config that names no runner):

- **Nothing from a checkpoint runs.** Files are read with ``torch.load(weights_only=True)``
  and nothing allow-listed (:mod:`mmseg_gate.engine.checkpoint`); the message hub is written as
  plain data; ``meta['config']``, which ``Runner.resume`` would execute as Python, is dropped.
- **Loads are complete.** ``load_from`` and ``--resume`` load the weights strictly: a key
  missing on either side, or of another shape, is an error naming the file (set
  ``load_strict = False`` in a config to fine-tune from a checkpoint of another model).
- **Resume is exact.** Checkpoints carry the model's random streams (torch's, CUDA's and the
  backbone's training noise, :mod:`mmseg_gate.engine.random_state`), restored right before
  the first resumed iteration; data order and augmentation resume exactly already (MMEngine
  replays the data pipeline over the trained batches). Validation leaves every stream
  untouched, so the run does not depend on when it validated. In distributed runs only rank
  0's streams are saved, so only a single-process run is bitwise exact.
- **Saves are atomic.** A checkpoint is written to a temporary file and renamed into place,
  so a kill during a save leaves the previous checkpoints intact.
"""
import os.path as osp
from typing import Optional

from mmengine.dist import get_rank, master_only
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint, _load_checkpoint_to_model

from mmseg.registry import HOOKS, RUNNERS
from ..fileio import commit, remove_stale_temporaries, temporary_name
from .checkpoint import (check_plain, is_plain_message_hub, plain_message_hub,
                         read_checkpoint, restore_message_hub, to_plain)
from .random_state import capture_random_state, restore_random_state


@HOOKS.register_module()
class TrainingStateHook(Hook):
    """Writes the message hub as plain data and the random streams into each checkpoint;
    restores the streams before the first resumed iteration; keeps validation from
    consuming them. ``GATERunner`` registers it itself."""

    priority = 'LOWEST'  # after hooks that add their own state to the checkpoint

    def __init__(self):
        self.pending_random_state: Optional[dict] = None
        self._before_val: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint['message_hub'] = plain_message_hub(checkpoint['message_hub'])
        checkpoint['meta'] = to_plain(checkpoint['meta'])  # dataset_meta may hold numpy
        checkpoint['random_state'] = capture_random_state(_unwrap(runner.model))
        check_plain(checkpoint)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        # The resumed loop has replayed the data pipeline up to here (MMEngine skips the
        # trained batches by loading them), which leaves numpy's and Python's streams where
        # the checkpoint found them and has just drawn this batch: restore the model's only.
        if self.pending_random_state is not None:
            restore_random_state(_unwrap(runner.model), self.pending_random_state, host=False)
            self.pending_random_state = None

    def before_val(self, runner) -> None:
        self._before_val = capture_random_state(_unwrap(runner.model))

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            restore_random_state(_unwrap(runner.model), self._before_val)
            self._before_val = None


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


@RUNNERS.register_module()
class GATERunner(Runner):
    """MMEngine's ``Runner`` with safe, complete, exact and atomic checkpoints (see the
    module docstring). Takes exactly ``Runner``'s arguments; reads ``load_strict`` (default
    True) from the config."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._state_hook = TrainingStateHook()
        self.register_hook(self._state_hook)
        self._resuming = False

    @property
    def load_strict(self) -> bool:
        return bool(self.cfg.get('load_strict', True))

    def resume(self, filename: str, *args, **kwargs) -> None:
        self._resuming = True
        try:
            super().resume(filename, *args, **kwargs)
        finally:
            self._resuming = False

    def load_checkpoint(self, filename: str, map_location='cpu', strict: bool = False,
                        revise_keys: list = [(r'^module.', '')]):
        """Read ``filename`` as plain data, drop what must not run, load the weights
        strictly (``load_strict``), and keep its random state if resuming."""
        if '://' in filename:
            checkpoint = _load_checkpoint(filename, map_location=map_location)
        else:
            checkpoint = read_checkpoint(filename, map_location=map_location)
        meta = checkpoint.get('meta', {}) if isinstance(checkpoint, dict) else {}
        if meta.pop('config', None) is not None:
            self.logger.warning(f"'{filename}': ignoring meta['config'] (Runner.resume would "
                                'execute it as Python).')
        random_state = checkpoint.pop('random_state', None) \
            if isinstance(checkpoint, dict) else None
        if self._resuming:
            hub = checkpoint.get('message_hub')
            if hub is None or not is_plain_message_hub(hub):
                raise ValueError(f"Checkpoint '{filename}' cannot be resumed: its message hub "
                                 'is missing or not plain data (not written by GATERunner).')
            checkpoint['message_hub'] = restore_message_hub(hub)
            if random_state is None:
                self.logger.warning(f"'{filename}' holds no random state: the resumed run "
                                    'will not repeat the uninterrupted one exactly.')
            elif get_rank() == 0:
                self._state_hook.pending_random_state = random_state
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = _unwrap(self.model)
        try:
            checkpoint = _load_checkpoint_to_model(model, checkpoint,
                                                   strict or self.load_strict or self._resuming,
                                                   revise_keys=revise_keys)
        except RuntimeError as err:
            raise RuntimeError(
                f"Checkpoint '{filename}' does not match the model: {err}\nCheck that the "
                'config is the one the checkpoint was trained with (or set load_strict=False '
                'in the config to load a checkpoint of another model partially).') from err
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint

    @master_only
    def save_checkpoint(self, out_dir: str, filename: str, *args, **kwargs) -> None:
        """MMEngine's save, into a temporary file renamed into place when complete."""
        remote = '://' in out_dir or kwargs.get('backend_args') or kwargs.get(
            'file_client_args') or any(isinstance(a, dict) for a in args[:1])
        if remote:
            return super().save_checkpoint(out_dir, filename, *args, **kwargs)
        remove_stale_temporaries(out_dir)  # left by a process killed while saving
        tmp_name = osp.basename(temporary_name(filename))
        super().save_checkpoint(out_dir, tmp_name, *args, **kwargs)
        commit(osp.join(out_dir, tmp_name), osp.join(out_dir, filename))
