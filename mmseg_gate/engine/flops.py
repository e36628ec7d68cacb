"""FLOPs of a call, by torch's FLOP counter (a multiply-add counts 2)."""
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def _count_cpu_attention() -> None:
    """torch's FLOP counter knows the CUDA attention kernels but not the CPU one that
    ``F.scaled_dot_product_attention`` dispatches to here; count it like the others."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry:
        return

    def formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    flop_counter.register_flop_formula(op)(formula)


def count_flops(fn) -> int:
    """The FLOPs of ``fn()``."""
    _count_cpu_attention()
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()
