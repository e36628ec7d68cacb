from .checkpoint import install_safe_local_loader, read_checkpoint
from .distributed import CPUDistributedDataParallel, setup_cpu_distributed
from .runner import GATERunner, TrainingStateHook

__all__ = ['CPUDistributedDataParallel', 'setup_cpu_distributed', 'GATERunner',
           'TrainingStateHook', 'install_safe_local_loader', 'read_checkpoint']
