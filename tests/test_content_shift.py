"""The GATE guideline: the content-shift metric, its pictures, reconstructions and the tool."""
import json
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmseg_gate import StableDiffusionSource
from mmseg_gate.sources.stable_diffusion import DEFAULT_TAPS
from mmseg_gate.analysis.content_shift import (content_shift, measure_content_shift,
                                               suppression_score)
from mmseg_gate.analysis.pictures import LABEL_HEIGHT, feature_grid

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def blur(x, size):
    return F.avg_pool2d(F.pad(x, [size // 2] * 4, mode='replicate'), size, stride=1)


def test_identical_features_have_no_shift():
    reference = torch.randn(2, 8, 16, 16)
    anchor = content_shift(reference, reference + torch.randn_like(reference))
    diff = content_shift(reference, reference.clone())
    assert torch.equal(diff, torch.zeros(2))
    assert torch.equal(suppression_score(diff, anchor), torch.ones(2))


def test_the_anchors_drift_scores_zero():
    reference = torch.randn(2, 8, 16, 16)
    drifted = reference + torch.randn_like(reference)
    anchor = content_shift(reference, drifted)
    assert torch.equal(suppression_score(content_shift(reference, drifted), anchor),
                       torch.zeros(2))


def test_blur_increases_the_shift():
    reference = torch.randn(1, 8, 32, 32)
    diffs = [content_shift(reference, blur(reference, k)).item() for k in (3, 5, 9)]
    assert 0 < diffs[0] < diffs[1] < diffs[2]


def test_measure_on_the_tiny_model(gate_kwargs):
    extractor = StableDiffusionSource(**gate_kwargs)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    result = measure_content_shift(extractor, images, [0, 50, 400], anchor_timestep=400,
                                   progress=False)
    assert extractor.timestep == 50  # restored
    tap = extractor.feature_info[0]['module']
    assert result['scores'][tap][0][0] == [1.0, 1.0]  # the reference itself
    assert result['scores'][tap][400][0] == [0.0, 0.0]  # the anchor itself
    summary = result['summary'][tap][50]
    assert set(summary) == {0, 1, 2} and summary[0]['n'] == 2
    assert all(-10 < s['mean'] <= 1 for s in summary.values())


def test_reference_and_anchor_with_denoising_config(tiny_sd):
    """With ``denoising_from`` (the label-scarce recipes): the t=0 reference is the clean
    latent's feature, the anchor a plain t=400 extraction; the config's own timestep is
    still the denoised recipe. References are computed with diffusers directly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    prompt = 'a photo of a street'
    extractor = StableDiffusionSource(model=tiny_sd, prompt=prompt, timestep=50,
                                     denoising_from=53)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    assert extractor.noise_plan(0) == (0, None) and extractor.noise_plan(400) == (400, 400)
    assert extractor.noise_plan() == extractor.noise_plan(50) == (50, 53)
    assert extractor.noise_plan(30) == (30, 53)

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder='vae')
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder='unet')
    taps = {}
    for name in DEFAULT_TAPS:
        unet.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: taps.__setitem__(name, out))
    with torch.no_grad():
        clean = vae.encode(image).latent_dist.mode() * vae.config.scaling_factor
        unet(clean, 0, extractor.embedding(0).hidden)
    reference = dict(taps)
    ours = extractor(image, 0, torch.Generator().manual_seed(0))[0]
    for name in DEFAULT_TAPS:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-5)

    plain = StableDiffusionSource(model=tiny_sd, prompt=prompt, timestep=400)
    anchor = plain(image, generator=torch.Generator().manual_seed(0))[0]
    measured = extractor(image, 400, torch.Generator().manual_seed(0))[0]
    for name in DEFAULT_TAPS:
        torch.testing.assert_close(measured[name], anchor[name], rtol=1e-4, atol=1e-5)

    result = measure_content_shift(extractor, image, [50], anchor_timestep=400,
                                   progress=False)
    for name in DEFAULT_TAPS:
        expected = content_shift(reference[name], anchor[name]).item()
        assert result['anchor_diffs'][name] == [pytest.approx(expected, rel=1e-4)]
    denoised = extractor(image, generator=torch.Generator().manual_seed(0))[0]
    assert extractor.counts['denoising_passes'] == 2 * 3  # the recipe, twice: by hand, measured
    name = DEFAULT_TAPS[0]
    expected = content_shift(reference[name], denoised[name])
    assert result['diffs'][name][50][0] == [pytest.approx(expected.item(), rel=1e-4)]


def test_bad_timesteps_fail_before_any_work(tiny_sd):
    extractor = StableDiffusionSource(model=tiny_sd)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    for bad in (1000, -1, 2.5):
        with pytest.raises(ValueError, match='timestep'):
            extractor(image, timestep=bad)
        with pytest.raises(ValueError, match='timestep'):
            measure_content_shift(extractor, image, [bad], anchor_timestep=400,
                                  progress=False)
    assert extractor.counts['vae_encodes'] == 0


def test_feature_grid_layout():
    image = torch.rand(3, 64, 96) * 2 - 1
    per_variant = [{'a': torch.randn(1, 8, 8, 12), 'b': torch.randn(1, 4, 4, 6)}
                   for _ in range(3)]
    grid = feature_grid(image, per_variant, ['v0', 'v1', 'v2'], ['a', 'b'], tile=96)
    assert grid.size == (96 * 4, 2 * (64 + 2 * LABEL_HEIGHT))


def test_reconstructions_run_on_the_tiny_model(gate_kwargs):
    from mmseg_gate.analysis.reconstruction import Reconstructor
    extractor = StableDiffusionSource(**gate_kwargs)
    reconstructor = Reconstructor(gate_kwargs['model'], extractor.variants,
                                  gate_kwargs['controlnets'], gate_kwargs['loras'],
                                  torch.device('cpu'))
    image = torch.rand(3, 64, 64) * 2 - 1
    images = reconstructor(image, strength=0.8, steps=3)
    assert len(images) == 3 and all(im.size == (64, 64) for im in images)
    pixels = [torch.from_numpy(np.asarray(im)).float() for im in images]
    # ControlNet and LoRA steer the reconstruction; the same call repeats exactly.
    assert (pixels[1] - pixels[0]).abs().mean() > 1 and (pixels[2] - pixels[1]).abs().mean() > 1
    again = reconstructor(image, strength=0.8, steps=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))


def test_tool_writes_the_table_and_pictures(make_demo_cfg, demo_root, tmp_path,
                                            run_tool_here):
    from mmseg.registry import RUNNERS
    cfg = make_demo_cfg(tmp_path / 'train', 2)
    RUNNERS.build(cfg).train()
    config = tmp_path / 'config.py'
    cfg.dump(str(config))
    images = [osp.join(demo_root, 'images', 'validation', f'ADE_valid_0000000{i}.jpg')
              for i in range(2)]
    out = tmp_path / 'out'
    result = run_tool_here('content_shift', str(config), *images, '--out', str(out), '--size', '64', '--timesteps',
                      '50', '200', '--anchor-timestep', '400', '--steps', '2',
                      '--checkpoint', str(tmp_path / 'train' / 'iter_2.pth'), '--no-progress')
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / 'content_shift.json').read_text())
    assert len(report['variants']) == 3 and report['timesteps'] == [50, 200]
    assert '| feature | t |' in (out / 'content_shift.md').read_text()
    for stem in ('ADE_valid_00000000', 'ADE_valid_00000001'):
        features = Image.open(out / f'features_{stem}.png')
        taps = len(report['summary'])  # the config's 3 taps + an attention tap
        assert taps == 4 and features.size == (128 * 4, taps * (128 + 2 * LABEL_HEIGHT))
        assert Image.open(out / f'reconstruction_{stem}.png').size == (
            128 * 4, 128 + LABEL_HEIGHT)
    assert Image.open(out / 'amalgamation_weights.png').size[0] > 100


@pytest.mark.parametrize('bad', ['config', 'image'])
def test_tool_names_what_is_missing(bad, tmp_path, run_tool_here):
    config = osp.join(ROOT, 'configs', 'gate_upernet_demo.py')
    args = [str(tmp_path / 'nope.py'), config] if bad == 'config' else \
        [config, str(tmp_path / 'nope.jpg')]
    result = run_tool_here('content_shift', *args)
    assert result.returncode != 0 and 'nope' in result.stderr
