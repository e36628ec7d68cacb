"""Distributed training on machines without CUDA.

MMEngine's ``init_dist`` calls ``torch.cuda.set_device`` and its Runner gives DDP
``device_ids=[LOCAL_RANK]``; both fail on the CPU. ``tools/train.py`` calls
:func:`setup_cpu_distributed` first: it starts a gloo process group (so the Runner skips
``init_dist``) and wraps the model with :class:`CPUDistributedDataParallel`.
"""
import os

import torch
import torch.distributed as dist
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` for CPU modules: DDP rejects ``device_ids`` there, and
    SyncBN needs CUDA, so it becomes plain BN (statistics per process).

    Without SyncBN each process ends training with its own BN running statistics, and
    validation (which bypasses DDP's forward and its buffer broadcast) would evaluate a
    different model on every rank. Before the first validation or test step after training
    steps, every rank therefore takes rank 0's buffers: the model rank 0 saves in its
    checkpoint, so the logged metrics equal ``tools/test.py`` on that checkpoint.
    """

    def __init__(self, module, device_ids=None, **kwargs):
        super().__init__(module=revert_sync_batchnorm(module), device_ids=None, **kwargs)
        self._buffers_from_rank0 = False

    def train_step(self, data, optim_wrapper):
        self._buffers_from_rank0 = False
        return super().train_step(data, optim_wrapper)

    def val_step(self, data):
        self._take_rank0_buffers()
        return super().val_step(data)

    def test_step(self, data):
        self._take_rank0_buffers()
        return super().test_step(data)

    def _take_rank0_buffers(self) -> None:
        if not self._buffers_from_rank0:
            for buffer in self.module.buffers():
                dist.broadcast(buffer, src=0)
            self._buffers_from_rank0 = True


def init_process_group(launcher: str) -> bool:
    """Join the process group of ``torchrun`` (``launcher='pytorch'``): MMEngine's
    ``init_dist`` with NCCL where there is CUDA, a gloo group otherwise; True if it did."""
    if launcher == 'none' or dist.is_initialized():
        return dist.is_initialized()
    if launcher != 'pytorch':
        raise ValueError(f"launcher must be 'none' or 'pytorch' here, got {launcher!r}.")
    if torch.cuda.is_available():
        from mmengine.dist import init_dist
        init_dist('pytorch', backend='nccl')
    else:
        dist.init_process_group(backend='gloo', rank=int(os.environ['RANK']),
                                world_size=int(os.environ['WORLD_SIZE']))
    return True


def setup_cpu_distributed(cfg) -> bool:
    """Prepare ``cfg`` for ``--launcher pytorch`` without CUDA; True if it did."""
    if cfg.get('launcher', 'none') != 'pytorch' or torch.cuda.is_available():
        return False
    init_process_group('pytorch')
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper['type'] = 'CPUDistributedDataParallel'
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper
    cfg.pop('sync_bn', None)  # converting to SyncBN needs CUDA
    return True
