"""MMEngine's Runner with checkpoints that are safe to load, complete, exact and atomic.

``GATERunner`` is MMEngine's ``Runner`` with these changes; select it with
``runner_type = 'GATERunner'`` (the shipped configs do, and ``tools/train.py``/``test.py`` use it
for any config that names no runner):

- **Nothing from a checkpoint runs.** Files are read with ``torch.load(weights_only=True)``
  and nothing allow-listed (:mod:`mmseg_gate.engine.checkpoint`; building a ``GATERunner``
  registers that reader as MMEngine's local-file loader, through MMEngine's
  ``CheckpointLoader.register_scheme``); the message hub is written as plain data;
  ``meta['config']``, which ``Runner.resume`` would execute as Python, is dropped (in
  ``TrainingStateHook.after_load_checkpoint``, before ``resume`` reads it).
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

from mmseg.registry import HOOKS, RUNNERS
from ..fileio import commit, remove_stale_temporaries, temporary_name
from .checkpoint import (check_plain, install_safe_local_loader, is_plain_message_hub,
                         plain_message_hub, restore_message_hub, to_plain)
from .random_state import capture_random_state, restore_random_state


@HOOKS.register_module()
class TrainingStateHook(Hook):
    """Writes the message hub as plain data and the random streams into each checkpoint;
    cleans a loaded one and, when resuming, restores the message hub and (before the first
    resumed iteration) the streams; keeps validation from consuming them. ``GATERunner``
    registers it itself."""

    priority = 'LOWEST'  # after hooks that add their own state to the checkpoint

    def __init__(self):
        self.pending_random_state: Optional[dict] = None
        self._before_val: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint['message_hub'] = plain_message_hub(checkpoint['message_hub'])
        checkpoint['meta'] = to_plain(checkpoint['meta'])  # dataset_meta may hold numpy
        checkpoint['random_state'] = capture_random_state(_unwrap(runner.model))
        check_plain(checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Before the weights load: drop ``meta['config']`` (``Runner.resume`` would execute
        it as Python) and take out the random state; when resuming, rebuild the message hub
        from its plain data and keep the random state for the first resumed iteration."""
        meta = checkpoint.get('meta', {})
        if isinstance(meta, dict) and meta.pop('config', None) is not None:
            runner.logger.warning("Ignoring the checkpoint's meta['config'] (Runner.resume "
                                  'would execute it as Python).')
        random_state = checkpoint.pop('random_state', None)
        if not getattr(runner, 'resuming', False):
            return
        hub = checkpoint.get('message_hub')
        if hub is None or not is_plain_message_hub(hub):
            raise ValueError('The checkpoint cannot be resumed: its message hub is missing or '
                             'not plain data (not written by GATERunner).')
        checkpoint['message_hub'] = restore_message_hub(hub)
        if random_state is None:
            runner.logger.warning('The checkpoint holds no random state: the resumed run will '
                                  'not repeat the uninterrupted one exactly.')
        elif get_rank() == 0:
            self.pending_random_state = random_state

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
        install_safe_local_loader()  # before the model is built (init_cfg=Pretrained reads)
        super().__init__(*args, **kwargs)
        self.register_hook(TrainingStateHook())
        self.resuming = False

    @property
    def load_strict(self) -> bool:
        return bool(self.cfg.get('load_strict', True))

    def resume(self, filename: str, *args, **kwargs) -> None:
        """MMEngine's ``resume``; ``resuming`` tells the hook to restore the run's state."""
        self.resuming = True
        try:
            super().resume(filename, *args, **kwargs)
        finally:
            self.resuming = False

    def load_checkpoint(self, filename: str, map_location='cpu', strict: bool = False,
                        revise_keys: list = [(r'^module.', '')]):
        """MMEngine's ``load_checkpoint``, strict unless the config sets ``load_strict=False``
        (always when resuming), with a message that names the file when the weights do not
        fit. The file is read as plain data (:func:`install_safe_local_loader`) and cleaned
        in :meth:`TrainingStateHook.after_load_checkpoint`."""
        try:
            return super().load_checkpoint(
                filename, map_location=map_location,
                strict=strict or self.load_strict or self.resuming, revise_keys=revise_keys)
        except RuntimeError as err:
            raise RuntimeError(
                f"Checkpoint '{filename}' does not match the model: {err}\nCheck that the "
                'config is the one the checkpoint was trained with (or set load_strict=False '
                'in the config to load a checkpoint of another model partially).') from err
        except ValueError as err:  # the hook's, which cannot know the file
            if filename in str(err):
                raise
            raise ValueError(f"Checkpoint '{filename}': {err}") from err

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
