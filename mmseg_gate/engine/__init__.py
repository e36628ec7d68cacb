from .distributed import CPUDistributedDataParallel, setup_cpu_distributed
from .safe_load import allow_mmengine_checkpoints

allow_mmengine_checkpoints()

__all__ = ['CPUDistributedDataParallel', 'setup_cpu_distributed', 'allow_mmengine_checkpoints']
