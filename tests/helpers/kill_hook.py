"""A hook that kills its own process (SIGKILL) after a given training iteration: a crash
between checkpoints, for the resume tests (imported by the config via custom_imports)."""
import os
import signal

from mmengine.hooks import Hook

from mmseg.registry import HOOKS


@HOOKS.register_module()
class KillAfterIterationHook(Hook):

    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)
