"""Measure a config's backbone: FLOPs, latency and peak memory of one forward pass.

    python tools/benchmark.py CONFIG --shape H W [--device cpu] [--iters N] [--batch B]
                              [--random-init [--arch sd15]]

``--random-init`` builds the model from its known architecture (``--arch``, default SD1.5)
with random weights, written to a temporary diffusers folder, so no download is needed; FLOPs
and speed are those of the real model. Prints one JSON line:

- ``flops``: the backbone forward (torch's FLOP counter; a multiply-add counts 2);
- ``unet_flops`` / ``unet_full_flops``: the truncated UNet pass against diffusers' full UNet
  forward on the same latent (what the early exit saves);
- ``latency_s_median``: median of ``--iters`` timed forwards after one warm-up;
- ``peak_mem_bytes``: CUDA: peak allocated during the timed forwards; CPU: peak resident
  memory of the process during them (weights included);
- ``unet_passes`` / ``vae_encodes``: per image, counted by the backbone.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from mmengine.config import Config
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import mmseg_gate  # noqa: F401
from mmseg.registry import MODELS
from mmseg_gate.models.diffusion.architectures import save_random_stable_diffusion


def parse_args():
    parser = argparse.ArgumentParser(description='Benchmark a GATE backbone')
    parser.add_argument('config')
    parser.add_argument('--shape', type=int, nargs=2, required=True, metavar=('H', 'W'))
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--random-init', action='store_true',
                        help='random weights of the known architecture (no download)')
    parser.add_argument('--arch', default='sd15', help='architecture for --random-init')
    return parser.parse_args()


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
    _count_cpu_attention()
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


class PeakMemory:
    """Peak memory over a block: CUDA allocator stats, or the process's peak RSS (VmHWM),
    reset through /proc/self/clear_refs on Linux."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            with open('/proc/self/status') as f:
                line = next(l for l in f if l.startswith('VmHWM:'))
            self.peak = int(line.split()[1]) * 1024


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def full_unet_flops(backbone, images: torch.Tensor) -> int:
    """FLOPs of diffusers' own full UNet forward on the latent the backbone would use."""
    diffusion = backbone.diffusion
    latents = diffusion.encode(backbone._to_vae_range(images))
    context = next(iter(diffusion.prompt_embeds.values())).expand(latents.shape[0], -1, -1)
    with torch.no_grad():
        return count_flops(lambda: diffusion.unet(latents, diffusion.timestep, context))


def benchmark(cfg: Config, shape, device: torch.device, iters: int, batch: int) -> dict:
    backbone = MODELS.build(cfg.model.backbone).to(device).eval()
    images = torch.randn(batch, 3, *shape, device=device)
    with torch.no_grad():
        backbone(images)  # warm-up, also moves the frozen parts to the device
        flops = count_flops(lambda: backbone(images))
        diffusion = backbone.diffusion
        latents = diffusion.encode(backbone._to_vae_range(images))
        unet_flops = count_flops(lambda: diffusion.unet_features(latents))
        unet_full = full_unet_flops(backbone, images)
        diffusion.counts.clear()
        times = []
        with PeakMemory(device) as memory:
            for _ in range(iters):
                sync(device)
                start = time.perf_counter()
                backbone(images)
                sync(device)
                times.append(time.perf_counter() - start)
    return dict(
        config=cfg.filename, shape=list(shape), batch=batch, device=str(device),
        frozen_dtype=str(diffusion.dtype).replace('torch.', ''),
        flops=flops, unet_flops=unet_flops, unet_full_flops=unet_full,
        unet_fraction=round(unet_flops / unet_full, 4),
        latency_s_median=round(statistics.median(times), 4), iters=iters,
        peak_mem_bytes=memory.peak,
        unet_passes=diffusion.counts['unet_passes'] / (iters * batch),
        vae_encodes=diffusion.counts['vae_encodes'] / (iters * batch),
        stages_run=diffusion.taps.stages_run)


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix='gate-bench-') as tmp:
        if args.random_init:
            cfg.model.backbone.sd_model = save_random_stable_diffusion(
                os.path.join(tmp, args.arch), args.arch)
        result = benchmark(cfg, args.shape, device, args.iters, args.batch)
    result['random_init'] = args.arch if args.random_init else False
    print(json.dumps(result))


if __name__ == '__main__':
    main()
