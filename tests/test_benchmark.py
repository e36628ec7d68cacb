"""tools/benchmark.py: the naive path computes the same features, and the JSON says so."""
import importlib.util
import json
import os.path as osp
import subprocess
import sys

import torch
from mmengine.config import Config

from mmseg_gate import GATEBackbone

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location(
        'gate_benchmark', osp.join(ROOT, 'tools', 'benchmark.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_naive_path_gives_the_same_features(gate_kwargs):
    """One VAE encode, shared ControlNet passes, mixed-adapter batches and early exit change
    nothing: each variant as its own full model copy (LoRA fused) gives the same output."""
    benchmark = load_benchmark_module()
    efficient = GATEBackbone(**gate_kwargs).eval()
    reference = GATEBackbone(**gate_kwargs).eval()
    reference.load_state_dict(efficient.state_dict())
    naive = benchmark.NaiveGATE(reference, Config(dict(model=dict(backbone=gate_kwargs))),
                                torch.device('cpu'))
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        for a, b in zip(efficient(images), naive(images)):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert naive.counts == {'vae_encodes': 6, 'controlnet_passes': 4, 'unet_passes': 6}


def test_benchmark_json_reports_both_ways():
    result = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'benchmark.py'),
         osp.join(ROOT, 'configs', 'gate_upernet_demo.py'), '--shape', '64', '64', '--device',
         'cpu', '--iters', '1', '--random-init', '--arch', 'tiny', '--lora-rank', '4',
         '--naive'], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(__import__('os').environ, HF_HUB_OFFLINE='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report['vae_encodes'], report['controlnet_passes'], report['unet_passes']) == (1, 1, 3)
    naive = report['naive']
    assert (naive['vae_encodes'], naive['controlnet_passes'], naive['unet_passes']) == (3, 2, 3)
    assert report['flops'] < naive['flops']
    assert report['flops_ratio'] == round(report['flops'] / naive['flops'], 4)
    assert report['stages_run'][-1] == 'up_blocks.2'
