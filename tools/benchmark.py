"""Measure a config's backbone: FLOPs, latency and peak memory of one forward pass.

    python tools/benchmark.py CONFIG --shape H W [--device cpu] [--iters N] [--batch B]
                              [--random-init [--arch sd15] [--lora-rank 64]] [--naive]

``--random-init`` builds the config's models from their known architecture (``--arch``,
default SD1.5) with random weights -- SD model, ControlNets, LoRAs on the LoRA recipe's targets
(``--lora-config``, default ``configs/lora/_base_.py``: LoCon, 12 module types) -- written to
a temporary folder and loaded through the real loading code, so no download is needed; FLOPs,
speed and memory are those of the real models. Prints one JSON line:

- ``flops``: the backbone forward (torch's FLOP counter; a multiply-add counts 2);
- ``unet_flops_per_variant`` / ``unet_full_flops_per_variant``: the truncated UNet pass
  against diffusers' full UNet forward on the same latent (what the early exit saves);
- ``latency_s_median``: median of ``--iters`` timed forwards after one warm-up;
- ``peak_mem_bytes``: CUDA: peak allocated during the timed forwards; CPU: peak resident
  memory of the process during them minus its resident memory before the model was built
  (weights and activations, not the libraries); ``process_peak_mem_bytes``: the raw figure;
- ``vae_encodes`` / ``controlnet_passes`` / ``unet_passes``: per image, counted;
- ``frozen_flops``: the features alone (the extractor, without the trainable fusion);
- with ``--naive``: ``fused`` (configs with LoRAs), the same measures with
  ``lora_mode='fused'`` (no LoRA compute, a UNet copy per LoRA); ``naive``, the authors' way (a
  full model copy and full passes per variant, then the same fusion), each in a process of its
  own; ``flops_ratio``, ``frozen_flops_ratio`` and ``speedup`` (fused against naive) and
  ``peak_mem_ratio`` (the config's mode, adapters by default, against naive).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from diffusers import UNet2DConditionModel
from mmengine.config import Config
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import mmseg_gate  # noqa: F401
from mmseg.registry import MODELS
from mmseg_gate import GATEFeatureExtractor
from mmseg_gate.engine.devices import default_device
from mmseg_gate.models.amalgamation import GATEFusion
from mmseg_gate.models.diffusion.extractor import extractor_kwargs
from mmseg_gate.models.diffusion.latents import encode_latents
from mmseg_gate.testing.architectures import write_random_models
from mmseg_gate.testing.naive import NaiveGATE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    parser = argparse.ArgumentParser(description='Benchmark a GATE backbone')
    parser.add_argument('config')
    parser.add_argument('--shape', type=int, nargs=2, required=True, metavar=('H', 'W'))
    parser.add_argument('--device', default=default_device())
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--random-init', action='store_true',
                        help='random weights of the known architecture (no download)')
    parser.add_argument('--arch', default='sd15', help='architecture for --random-init')
    parser.add_argument('--lora-rank', type=int, default=64,
                        help='rank of the random LoRAs of --random-init (paper: 64)')
    parser.add_argument('--lora-config', default=os.path.join(ROOT, 'configs', 'lora',
                                                              '_base_.py'),
                        help='LoRA recipe whose target_modules the random LoRAs use')
    parser.add_argument('--naive', action='store_true',
                        help='also measure the straightforward way (a model copy and full '
                        'passes per variant) and report both with their ratios')
    parser.add_argument('--mode', choices=['all', 'efficient', 'fused', 'naive'],
                        default='all', help=argparse.SUPPRESS)
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


def resident_bytes(field: str = 'VmRSS') -> int:
    with open('/proc/self/status') as f:
        return int(next(l for l in f if l.startswith(field + ':')).split()[1]) * 1024


class PeakMemory:
    """Peak memory over a block. CUDA: the allocator's peak. CPU: the process's peak resident
    memory (VmHWM, reset through /proc/self/clear_refs) minus ``baseline``, its resident
    memory before the model was built (the libraries: about 0.9 GB here, the same for every
    way), which is what CUDA's figure leaves out too; ``process_peak`` keeps the raw figure."""

    def __init__(self, device: torch.device, baseline: int = 0):
        self.device, self.baseline = device, baseline

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
            self.peak = self.process_peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.process_peak = resident_bytes('VmHWM')
            self.peak = self.process_peak - self.baseline


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def unet_flops(extractor: GATEFeatureExtractor, latents: torch.Tensor):
    """FLOPs of one variant's truncated UNet pass (the first variant's prompt, base weights,
    no guidance) and of diffusers' full forward of the same UNet, freshly loaded (the
    extractor frees the stages it never runs)."""
    embed = extractor.embedding(0)
    num = latents.shape[0]
    context = embed.hidden.expand(num, -1, -1)
    added = None
    if extractor.is_sdxl:
        pixels = torch.zeros(num, 3, *(s * 8 for s in latents.shape[-2:]))
        added = dict(text_embeds=embed.pooled.expand(num, -1),
                     time_ids=extractor._time_ids(pixels.to(latents.device)))
    t = extractor.timestep
    full_unet = UNet2DConditionModel.from_pretrained(
        extractor.source, subfolder='unet', use_safetensors=True).to(latents.device,
                                                                     latents.dtype)
    with torch.no_grad():
        with extractor._adapters(None, [0], num):  # base weights: no LoRA
            truncated = count_flops(lambda: extractor.taps[None](latents, t, context,
                                                                added_cond_kwargs=added))
        full = count_flops(lambda: full_unet(latents, t, context, added_cond_kwargs=added))
    return truncated, full


def timed(forward, device, iters: int, baseline: int):
    """Median latency and peak memory of ``iters`` calls of ``forward``."""
    times = []
    with PeakMemory(device, baseline) as memory:
        for _ in range(iters):
            sync(device)
            start = time.perf_counter()
            forward()
            sync(device)
            times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4), memory


def measure(forward, frozen_half, counts, device, iters: int, batch: int,
            baseline: int) -> dict:
    """FLOPs, latency, peak memory and work per image of ``forward`` (warmed up first),
    and the FLOPs of its ``frozen_half`` (the features alone)."""
    with torch.no_grad():
        forward()  # warm-up, also moves the frozen parts to the device
        flops = count_flops(forward)
        frozen_flops = count_flops(frozen_half)
        counts.clear()
        latency, memory = timed(forward, device, iters, baseline)
    per_image = iters * batch
    return dict(flops=flops, frozen_flops=frozen_flops, latency_s_median=latency,
                peak_mem_bytes=memory.peak, process_peak_mem_bytes=memory.process_peak,
                vae_encodes=counts['vae_encodes'] / per_image,
                controlnet_passes=counts['controlnet_passes'] / per_image,
                unet_passes=counts['unet_passes'] / per_image)


def benchmark(cfg: Config, shape, device: torch.device, iters: int, batch: int) -> dict:
    """GATE as built: shared VAE encode and ControlNet passes, batched truncated UNet."""
    baseline = resident_bytes()
    backbone = MODELS.build(cfg.model.backbone).to(device).eval()
    extractor = backbone.extractor
    images = torch.rand(batch, 3, *shape, device=device) * 2 - 1
    result = measure(lambda: backbone(images),
                     lambda: extractor(backbone.to_vae_range(images),
                                       generator=torch.Generator()),
                     extractor.counts, device, iters, batch, baseline)
    latents = encode_latents(extractor.vae, torch.zeros(
        batch, 3, *(-(-s // extractor.size_multiple) * extractor.size_multiple for s in shape),
        device=device))
    truncated, full = unet_flops(extractor, latents)
    return dict(config=cfg.filename, shape=list(shape), batch=batch, device=str(device),
                frozen_dtype=str(extractor.dtype).replace('torch.', ''),
                lora_mode=extractor.lora_mode, variants=len(extractor.variants),
                **result, iters=iters, unet_flops_per_variant=truncated,
                unet_full_flops_per_variant=full, unet_fraction=round(truncated / full, 4),
                stages_run=extractor.stages_run)


def benchmark_naive(cfg: Config, shape, device: torch.device, iters: int, batch: int) -> dict:
    """The authors' way: a model copy and full passes per variant, then the same fusion."""
    backbone_cfg = cfg.model.backbone
    baseline = resident_bytes()
    naive = NaiveGATE(device, **extractor_kwargs(backbone_cfg))
    images = torch.rand(batch, 3, *shape, device=device) * 2 - 1
    with torch.no_grad():
        naive(images)  # learns its features' channels and strides
    fusion = GATEFusion(naive.feature_info, len(naive.variants), backbone_cfg.get('num_assigners', 1),
                        backbone_cfg.get('assigner_cfg', dict(hidden_channels=128,
                                                              dropout_ratio=0.5)),
                        backbone_cfg.get('num_refine_blocks', 1)).to(device).eval()
    return measure(lambda: fusion(naive(images)), lambda: naive(images), naive.counts, device,
                   iters, batch, baseline)


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
    if args.mode in ('efficient', 'fused'):
        if args.mode == 'fused':
            cfg.model.backbone.lora_mode = 'fused'
        print(json.dumps(benchmark(cfg, args.shape, device, args.iters, args.batch)))
        return
    if args.mode == 'naive':
        print(json.dumps(benchmark_naive(cfg, args.shape, device, args.iters, args.batch)))
        return
    with tempfile.TemporaryDirectory(prefix='gate-bench-') as tmp:
        if args.random_init:
            targets = Config.fromfile(args.lora_config).target_modules
            write_random_models(cfg.model.backbone, tmp, args.arch, args.lora_rank, targets)
        resolved = os.path.join(tmp, 'config.py')
        cfg.dump(resolved)
        result = run_mode(resolved, 'efficient', args)
        result['config'] = args.config
        if args.naive:
            naive = run_mode(resolved, 'naive', args)
            fused = result
            if cfg.model.backbone.get('loras'):
                fused = run_mode(resolved, 'fused', args)
                result['fused'] = {k: fused[k] for k in (
                    'flops', 'frozen_flops', 'latency_s_median', 'peak_mem_bytes',
                    'process_peak_mem_bytes', 'unet_passes')}
            result['naive'] = naive
            result['flops_ratio'] = round(fused['flops'] / naive['flops'], 4)
            result['frozen_flops_ratio'] = round(fused['frozen_flops'] / naive['frozen_flops'],
                                                 4)
            result['speedup'] = round(naive['latency_s_median'] / fused['latency_s_median'], 3)
            result['peak_mem_ratio'] = round(result['peak_mem_bytes'] /
                                             naive['peak_mem_bytes'], 4)
            result['process_peak_mem_ratio'] = round(result['process_peak_mem_bytes'] /
                                                     naive['process_peak_mem_bytes'], 4)
    result['random_init'] = args.arch if args.random_init else False
    print(json.dumps(result))


if __name__ == '__main__':
    main()
