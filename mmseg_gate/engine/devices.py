"""Where frozen models run and in which precision: one rule for every part and tool."""
import torch

DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
# The LoRA trainer's --mixed-precision values, spelled as accelerate and diffusers do.
PRECISIONS = {'no': 'float32', 'fp16': 'float16', 'bf16': 'bfloat16'}


def default_device() -> str:
    """What every tool runs on unless told: the GPU where there is one."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def resolve_dtype(name: str, device, what: str = 'frozen_dtype') -> torch.dtype:
    """'auto' is float16 on accelerators and float32 on the CPU (half precision is slow and
    partly unsupported there); otherwise a name of :data:`DTYPES` or :data:`PRECISIONS`."""
    if name == 'auto':
        return torch.float32 if torch.device(device).type == 'cpu' else torch.float16
    name = PRECISIONS.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"{what} must be 'auto' or one of {sorted(DTYPES)} (or "
                         f'{sorted(PRECISIONS)}), got {name!r}.')
    return DTYPES[name]
