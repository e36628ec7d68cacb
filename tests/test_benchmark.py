"""tools/benchmark.py and the naive reference it measures against."""
import json
import os
import os.path as osp
import subprocess
import sys

import torch

from mmseg_gate import StableDiffusionSource
from mmseg_gate.benchmark import NaiveGATE

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_naive_path_gives_the_same_features(gate_kwargs):
    """One VAE encode, shared ControlNet passes, mixed-adapter batches and early exit change
    nothing: each variant as its own full model copy (LoRA fused) gives the same features."""
    extractor = StableDiffusionSource(**gate_kwargs)
    naive = NaiveGATE(torch.device('cpu'), gate_kwargs)
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    ours, theirs = extractor(images), naive(images)
    for variant_ours, variant_theirs in zip(ours, theirs):
        assert variant_ours.keys() == variant_theirs.keys()
        for tap in variant_ours:
            torch.testing.assert_close(variant_ours[tap], variant_theirs[tap], rtol=1e-3,
                                       atol=1e-4)
    assert naive.counts == {'vae_encodes': 6, 'controlnet_passes': 4, 'unet_passes': 6}


def test_benchmark_json_reports_every_way():
    result = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'benchmark.py'),
         osp.join(ROOT, 'configs', 'gate_upernet_demo.py'), '--shape', '64', '64', '--device',
         'cpu', '--iters', '1', '--random-init', '--arch', 'tiny', '--lora-rank', '4',
         '--naive'], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report['vae_encodes'], report['controlnet_passes'], report['unet_passes']) == (1, 1, 3)
    naive = report['naive']
    assert (naive['vae_encodes'], naive['controlnet_passes'], naive['unet_passes']) == (3, 2, 3)
    assert report['fused']['flops'] < report['flops'] < naive['flops']  # fused: no LoRA maths
    assert report['flops_ratio'] == round(report['fused']['flops'] / naive['flops'], 4)
    assert report['stages_run'][-1] == 'up_blocks.2'


def _benchmark_random(config: str, arch: str, folder) -> dict:
    """What ``tools/benchmark.py CONFIG --random-init --arch ARCH --shape 64 64 --iters 1``
    measures (without --naive it measures one mode), here in this process: random weights
    of ``arch`` written for every part of the config's source, then the benchmark."""
    from mmengine.config import Config
    from mmseg_gate.benchmark import benchmark, with_backbone
    from mmseg_gate.testing.random_models import write_random_models
    cfg = with_backbone(Config.fromfile(osp.join(ROOT, 'configs', config)))
    recipe = Config.fromfile(osp.join(ROOT, 'configs', 'lora', '_base_.py'))
    write_random_models(cfg.model.backbone.source, str(folder), arch, 4, recipe.target_modules)
    return benchmark(cfg, (64, 64), torch.device('cpu'), iters=1, batch=1)


def test_benchmark_takes_composite_and_correspondence_configs(tmp_path, run_tool_here):
    """The label-scarce recipe (SD beside ADM) and the GATE + DINOv2 correspondence recipe,
    with random weights of the tiny architectures."""
    for config, passes in (('label_scarce/gate_pixel_demo.py', 3 + 3),
                           ('correspondence/gate_dinov2_spair_demo.py', 6 + 1)):
        report = _benchmark_random(config, 'tiny', tmp_path / config.replace('/', '-'))
        assert report['unet_passes'] == passes and report['frozen_flops'] > 0, config
        assert report['flops'] > report['frozen_flops'], config  # + the fusion
        assert report['source'].startswith('CompositeSource')
    refused = run_tool_here('benchmark', osp.join(ROOT, 'configs', 'label_scarce',
                                                  'gate_pixel_demo.py'), '--shape', '64',
                            '64', '--naive')
    assert refused.returncode == 1 and 'without --naive' in refused.stderr


def test_benchmark_builds_the_dit_architectures(tmp_path):
    """The shipped SD3.5 and FLUX configs on their architectures' layouts at CPU size
    (sharded transformer files, text encoders of one layer): the blocks run, and the real
    text encoders' sizes (counted on the meta device)."""
    for config, arch, blocks in (('gate_upernet_ade20k_sd35.py', 'tiny-sd35', (13, 24)),
                                 ('gate_upernet_ade20k_flux.py', 'tiny-flux', (19, 57))):
        report = _benchmark_random(config, arch, tmp_path / arch)
        assert (report['blocks_run'], report['blocks_total']) == blocks, config
        assert report['transformer_passes'] == 1 and report['vae_encodes'] == 1
        assert 0 < report['frozen_flops'] < report['flops']
    # The real encoders, on the meta device: CLIP-L, CLIP-G (with projections), T5-XXL's
    # encoder (4.76B, its published size).
    from mmseg_gate.testing.dit_architectures import text_encoder_sizes
    assert text_encoder_sizes('sd35') == dict(text_encoder=123_650_304,
                                              text_encoder_2=694_659_840,
                                              text_encoder_3=4_762_310_656)
