"""Measure a config's backbone: FLOPs, latency and peak memory of one forward pass.

    python tools/benchmark.py CONFIG --shape H W [--device cpu] [--iters N] [--batch B]
                              [--random-init [--arch sd15] [--lora-rank 64]] [--naive]

``--random-init`` builds the config's models from their known architecture (``--arch``,
default SD1.5) with random weights -- SD model, ControlNets, LoRAs -- written to a temporary
folder and loaded through the real loading code, so no download is needed; FLOPs and speed
are those of the real models. Prints one JSON line:

- ``flops``: the backbone forward (torch's FLOP counter; a multiply-add counts 2);
- ``unet_flops_per_variant`` / ``unet_full_flops_per_variant``: the truncated UNet pass
  against diffusers' full UNet forward on the same latent (what the early exit saves);
- ``latency_s_median``: median of ``--iters`` timed forwards after one warm-up;
- ``peak_mem_bytes``: CUDA: peak allocated during the timed forwards; CPU: peak resident
  memory of the process during them (weights included);
- ``vae_encodes`` / ``controlnet_passes`` / ``unet_passes``: per image, counted;
- with ``--naive``: ``naive`` (the same measures for a model copy and full passes per
  variant, in a separate process), ``flops_ratio``, ``speedup`` and ``peak_mem_ratio``.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

import torch
from mmengine.config import Config
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import mmseg_gate  # noqa: F401
from mmseg.registry import MODELS
from mmseg_gate.models.diffusion.frozen import resolve_dtype
from mmseg_gate.models.diffusion.architectures import (save_random_controlnet, save_random_lora,
                                                       save_random_stable_diffusion)


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
    parser.add_argument('--lora-rank', type=int, default=64,
                        help='rank of the random LoRAs of --random-init (paper: 64)')
    parser.add_argument('--naive', action='store_true',
                        help='also measure the straightforward way (a model copy and full '
                        'passes per variant) and report both with their ratios')
    parser.add_argument('--mode', choices=['both', 'efficient', 'naive'], default='both',
                        help=argparse.SUPPRESS)
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
    """FLOPs of diffusers' own full UNet forward (one variant) on the backbone's latent."""
    diffusion = backbone.diffusion
    latents = diffusion.encode(backbone.to_vae_range(images))
    context = next(iter(diffusion.prompt_embeds.values())).expand(latents.shape[0], -1, -1)
    with torch.no_grad():
        return count_flops(lambda: diffusion.unet(latents, diffusion.timestep, context))


def timed(forward, device, iters: int):
    """Median latency and peak memory of ``iters`` calls of ``forward``."""
    times = []
    with PeakMemory(device) as memory:
        for _ in range(iters):
            sync(device)
            start = time.perf_counter()
            forward()
            sync(device)
            times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4), memory.peak


def benchmark(cfg: Config, shape, device: torch.device, iters: int, batch: int) -> dict:
    """GATE as built: shared VAE encode and ControlNet passes, batched truncated UNet."""
    backbone = MODELS.build(cfg.model.backbone).to(device).eval()
    images = torch.randn(batch, 3, *shape, device=device)
    with torch.no_grad():
        backbone(images)  # warm-up, also moves the frozen parts to the device
        flops = count_flops(lambda: backbone(images))
        diffusion = backbone.diffusion
        latents = diffusion.encode(backbone.to_vae_range(images))
        num_variants = len(diffusion.variants)
        unet_flops = count_flops(lambda: diffusion.unet_features(latents)) // num_variants
        unet_full = full_unet_flops(backbone, images)
        diffusion.counts.clear()
        latency, peak = timed(lambda: backbone(images), device, iters)
    per_image = iters * batch
    return dict(
        config=cfg.filename, shape=list(shape), batch=batch, device=str(device),
        frozen_dtype=str(diffusion.dtype).replace('torch.', ''), variants=num_variants,
        flops=flops, unet_flops_per_variant=unet_flops,
        unet_full_flops_per_variant=unet_full, unet_fraction=round(unet_flops / unet_full, 4),
        latency_s_median=latency, iters=iters, peak_mem_bytes=peak,
        vae_encodes=diffusion.counts['vae_encodes'] / per_image,
        controlnet_passes=diffusion.counts['controlnet_passes'] / per_image,
        unet_passes=diffusion.counts['unet_passes'] / per_image,
        stages_run=diffusion.taps.stages_run)


class NaiveGATE:
    """The straightforward way, as the authors' code runs GATE: every variant is a full model
    copy (its LoRA fused into its own UNet, its own ControlNets) and runs on its own: its own
    VAE encode, its own ControlNet passes, the whole UNet up to ``conv_out``."""

    def __init__(self, backbone, cfg: Config, device: torch.device):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from mmseg_gate.models.diffusion.controlnets import load_controlnet
        from mmseg_gate.models.diffusion.lora import load_lora_adapters
        self.backbone = backbone
        diffusion = backbone.diffusion
        self.variants, self.prompt_embeds = diffusion.variants, diffusion.prompt_embeds
        self.taps, self.timestep = diffusion.taps.taps, diffusion.timestep
        self.scheduler, self.detectors = diffusion.scheduler, diffusion.detectors
        self.dtype = dtype = resolve_dtype(diffusion.dtype_name, device)
        self.prompt_embeds = {p: e.to(device, dtype) for p, e in self.prompt_embeds.items()}
        backbone.diffusion = None  # only the copies below stay in memory
        source, loras = cfg.model.backbone.sd_model, cfg.model.backbone.get('loras') or {}
        controlnets = cfg.model.backbone.get('controlnets') or {}
        self.copies = []
        for variant in self.variants:
            vae = AutoencoderKL.from_pretrained(source, subfolder='vae', use_safetensors=True)
            unet = UNet2DConditionModel.from_pretrained(source, subfolder='unet',
                                                        use_safetensors=True)
            if variant.lora is not None:
                load_lora_adapters(unet, {variant.adapter: loras[variant.lora]},
                                   {variant.adapter: variant.lora_scale})
                unet.fuse_lora(adapter_names=[variant.adapter])
                unet.unload_lora()
            nets = {name: load_controlnet(controlnets[name]['model'], unet)
                    for name, _ in variant.controlnets}
            self.copies.append((vae.to(device, dtype).eval(), unet.to(device, dtype).eval(),
                                {n: net.to(device, dtype) for n, net in nets.items()}))
        self.counts = Counter()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor):
        pixels = self.backbone.to_vae_range(images).to(self.dtype)
        per_variant = [self._variant(v, *copy, pixels) for v, copy in
                       zip(self.variants, self.copies)]
        return self.backbone.fuse(per_variant, *images.shape[-2:])

    def _variant(self, variant, vae, unet, controlnets, pixels):
        self.counts['vae_encodes'] += len(pixels)
        latent = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0),
                            dtype=torch.float32)
        t = torch.full((len(latent), ), self.timestep, dtype=torch.long)
        noisy = self.scheduler.add_noise(latent, noise.to(latent), t)
        context = self.prompt_embeds[variant.prompt].expand(len(latent), -1, -1)
        down = mid = None
        for name, scale in variant.controlnets:
            self.counts['controlnet_passes'] += len(pixels)
            d, m = controlnets[name](noisy, self.timestep, context,
                                     controlnet_cond=self.detectors[name](pixels).to(self.dtype),
                                     conditioning_scale=scale, return_dict=False)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        captured, modules = {}, dict(unet.named_modules())
        handles = [modules[tap].register_forward_hook(
            lambda _m, _i, out, tap=tap: captured.__setitem__(tap, out)) for tap in self.taps]
        self.counts['unet_passes'] += len(pixels)
        unet(noisy, self.timestep, context, down_block_additional_residuals=down,
             mid_block_additional_residual=mid)
        for handle in handles:
            handle.remove()
        return [captured[tap] for tap in self.taps]


def benchmark_naive(cfg: Config, shape, device: torch.device, iters: int, batch: int) -> dict:
    naive = NaiveGATE(MODELS.build(cfg.model.backbone).to(device).eval(), cfg, device)
    images = torch.randn(batch, 3, *shape, device=device)
    with torch.no_grad():
        naive(images)  # warm-up
        flops = count_flops(lambda: naive(images))
        naive.counts.clear()
        latency, peak = timed(lambda: naive(images), device, iters)
    per_image = iters * batch
    return dict(flops=flops, latency_s_median=latency, peak_mem_bytes=peak,
                vae_encodes=naive.counts['vae_encodes'] / per_image,
                controlnet_passes=naive.counts['controlnet_passes'] / per_image,
                unet_passes=naive.counts['unet_passes'] / per_image)


def write_random_models(cfg: Config, folder: str, arch: str, lora_rank: int) -> None:
    """Random weights of ``arch`` for the config's SD model, ControlNets and LoRAs."""
    backbone = cfg.model.backbone
    backbone.sd_model = save_random_stable_diffusion(os.path.join(folder, arch), arch)
    for name, controlnet in (backbone.get('controlnets') or {}).items():
        controlnet.model = save_random_controlnet(os.path.join(folder, f'controlnet-{name}'),
                                                  backbone.sd_model)
    for i, name in enumerate(backbone.get('loras') or {}):
        backbone.loras[name] = save_random_lora(
            os.path.join(folder, f'lora-{name}.safetensors'), backbone.sd_model, lora_rank,
            seed=i)


def run_mode(config_path: str, mode: str, args) -> dict:
    """One mode in its own process, so each one's peak memory is its own."""
    command = [sys.executable, __file__, config_path, '--mode', mode, '--shape',
               *map(str, args.shape), '--device', args.device, '--iters', str(args.iters),
               '--batch', str(args.batch)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f'{mode} benchmark failed:\n{result.stderr[-4000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.mode == 'efficient':
        print(json.dumps(benchmark(cfg, args.shape, device, args.iters, args.batch)))
        return
    if args.mode == 'naive':
        print(json.dumps(benchmark_naive(cfg, args.shape, device, args.iters, args.batch)))
        return
    with tempfile.TemporaryDirectory(prefix='gate-bench-') as tmp:
        if args.random_init:
            write_random_models(cfg, tmp, args.arch, args.lora_rank)
        resolved = os.path.join(tmp, 'config.py')
        cfg.dump(resolved)
        result = run_mode(resolved, 'efficient', args)
        result['config'] = args.config
        if args.naive:
            naive = run_mode(resolved, 'naive', args)
            result['naive'] = naive
            result['flops_ratio'] = round(result['flops'] / naive['flops'], 4)
            result['speedup'] = round(naive['latency_s_median'] / result['latency_s_median'],
                                      3)
            result['peak_mem_ratio'] = round(result['peak_mem_bytes'] /
                                             naive['peak_mem_bytes'], 4)
    result['random_init'] = args.arch if args.random_init else False
    print(json.dumps(result))


if __name__ == '__main__':
    main()
