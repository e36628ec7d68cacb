"""Measure a config's backbone: FLOPs, latency and peak memory of one forward pass.

    python tools/benchmark.py CONFIG --shape H W [--device cpu] [--iters N] [--batch B]
                              [--random-init [--arch sd15] [--lora-rank 64]] [--naive]

``--random-init`` builds the config's models from their known architecture (``--arch``,
default SD1.5; sd21, sdxl; sd35 and flux for the DiT configs: SD3.5-medium and FLUX.1-dev,
the transformer and VAE at their real size, the text encoders at their real widths with one
layer, since prompts are encoded once -- their real sizes are reported) with random
weights -- SD model, ControlNets, LoRAs on the LoRA recipe's targets (``--lora-config``,
default ``configs/lora/_base_.py``: LoCon, 12 module types) -- written to a temporary folder
and loaded through the real loading code, so no download is needed; FLOPs, speed and memory
are those of the real models. Prints one JSON line: the measures of
``mmseg_gate/benchmark.py`` (its docstring says what each is), and with ``--naive``:
``fused`` (configs with LoRAs), the same measures with ``lora_mode='fused'`` (no LoRA compute,
a UNet copy per LoRA); ``naive``, the authors' way (a full model copy and full passes per
variant, then the same fusion), each in a process of its own; ``flops_ratio`` and
``frozen_flops_ratio`` (fused against naive), ``speedup`` and ``peak_mem_ratio`` (the
config's mode, adapters by default, against naive) and ``fused_speedup``.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from mmengine.config import Config

import mmseg_gate  # noqa: F401
from mmseg_gate.benchmark import benchmark, benchmark_naive, compare, with_backbone
from mmseg_gate.engine.cli import UsageError, run_tool
from mmseg_gate.engine.devices import default_device
from mmseg_gate.testing.random_models import write_random_models
from mmseg_gate.testing.dit_architectures import DIT_ARCHITECTURES, text_encoder_sizes

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
    cfg = with_backbone(Config.fromfile(args.config))
    kind = cfg.model.backbone.source.get('type', 'StableDiffusionSource')
    if args.naive and kind != 'StableDiffusionSource':
        raise UsageError(f'--naive compares against the authors\' way for a Stable Diffusion '
                         f'source; this config\'s source is a {kind}: run without --naive.')
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.mode in ('efficient', 'fused'):
        if args.mode == 'fused':
            cfg.model.backbone.source.lora_mode = 'fused'
        print(json.dumps(benchmark(cfg, args.shape, device, args.iters, args.batch)))
        return
    if args.mode == 'naive':
        print(json.dumps(benchmark_naive(cfg, args.shape, device, args.iters, args.batch)))
        return
    with tempfile.TemporaryDirectory(prefix='gate-bench-') as tmp:
        if args.random_init:
            targets = Config.fromfile(args.lora_config).target_modules
            write_random_models(cfg.model.backbone.source, tmp, args.arch, args.lora_rank,
                                targets)
        resolved = os.path.join(tmp, 'config.py')
        cfg.dump(resolved)
        result = run_mode(resolved, 'efficient', args)
        result['config'] = args.config
        if args.naive:
            naive = run_mode(resolved, 'naive', args)
            fused = result
            if cfg.model.backbone.source.get('loras'):
                fused = run_mode(resolved, 'fused', args)
                result['fused'] = {k: fused[k] for k in (
                    'flops', 'frozen_flops', 'latency_s_median', 'peak_mem_bytes',
                    'process_peak_mem_bytes', 'unet_passes')}
            result['naive'] = naive
            result.update(compare(result, naive, fused))
    result['random_init'] = args.arch if args.random_init else False
    if args.random_init and args.arch in DIT_ARCHITECTURES:
        # The random pipeline's text encoders have the real widths but one layer (prompts
        # are encoded once, then dropped); their real sizes, counted on the meta device:
        result['text_encoder_params_real'] = text_encoder_sizes(args.arch)
        result['text_encoders_built'] = 'real widths, one layer each'
    print(json.dumps(result))


if __name__ == '__main__':
    run_tool('benchmark', main)
