"""StableDiffusionSource: the frozen half on its own, for every GATE task."""
import math

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

from mmseg.registry import RUNNERS
from mmseg_gate import GATEFeatureExtractor, StableDiffusionSource, build_source
from mmseg_gate.sources.stable_diffusion import ATTENTION_MAPS, DEFAULT_TAPS
from mmseg_gate.sources.common.conditions import ConditionDetector
from mmseg_gate.sources.common.taps import first_tensor

BLOCK = 'up_blocks.2.attentions.0'
TOKEN_TAPS = [f'{BLOCK}.transformer_blocks.0.attn1', f'{BLOCK}.transformer_blocks.0.attn2.to_q',
              f'{BLOCK}.transformer_blocks.0.ff']


def images(size=(64, 128), seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2, 3, 4, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode='nearest')


def test_plain_script_use(tiny_sd):
    extractor = StableDiffusionSource(model=tiny_sd, prompt='a photo of a horse')
    feats = extractor(torch.rand(2, 3, 70, 90) * 2 - 1)
    assert len(feats) == 1 and list(feats[0]) == list(DEFAULT_TAPS)
    assert [(f['module'], f['num_chs'], f['reduction']) for f in extractor.feature_info] == [
        (DEFAULT_TAPS[0], 64, 32), (DEFAULT_TAPS[1], 64, 16), (DEFAULT_TAPS[2], 64, 8)]
    for info in extractor.feature_info:
        stride = info['reduction']
        assert feats[0][info['module']].shape == (2, 64, math.ceil(70 / stride),
                                                math.ceil(90 / stride))
    # Built from a config (the registry), and under its former name.
    again = build_source(dict(type='StableDiffusionSource', model=tiny_sd,
                              prompt='a photo of a horse'))
    x = images()
    assert all(torch.equal(a, b) for a, b in zip(extractor(x)[0].values(),
                                                   again(x)[0].values()))
    assert GATEFeatureExtractor is StableDiffusionSource
    assert [f['num_variants'] for f in extractor.feature_info] == [1, 1, 1]


def test_token_sequence_taps_come_back_as_maps(tiny_sd):
    extractor = StableDiffusionSource(model=tiny_sd, prompt='a photo',
                                     taps=TOKEN_TAPS + [BLOCK])
    raw = {}
    handles = [extractor.unet.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: raw.__setitem__(name, first_tensor(out)))
        for name in TOKEN_TAPS]
    feats = extractor(images())[0]  # latent 8x16; up block 2 works at 4x8 (stride 16)
    for handle in handles:
        handle.remove()
    for name in TOKEN_TAPS:
        tokens = raw[name]
        assert tokens.shape[1] == 4 * 8
        expected = tokens.transpose(1, 2).reshape(2, tokens.shape[2], 4, 8)
        assert torch.equal(feats[name], expected), name
    strides = {f['module']: f['reduction'] for f in extractor.feature_info}
    assert all(strides[name] == 16 for name in TOKEN_TAPS + [BLOCK])


def test_text_token_taps_are_refused(tiny_sd):
    with pytest.raises(ValueError, match='(?s)attn2.to_k.*text tokens'):
        StableDiffusionSource(model=tiny_sd,
                             taps=[f'{BLOCK}.transformer_blocks.0.attn2.to_k'])


def test_cross_attention_maps(tiny_sd):
    plain = StableDiffusionSource(model=tiny_sd, prompt='a photo of a horse')
    extractor = StableDiffusionSource(model=tiny_sd, prompt='a photo of a horse',
                                     attention_maps=dict(strides=(32, 16)))
    info = {f['module']: f for f in extractor.feature_info}
    assert (info[ATTENTION_MAPS]['num_chs'], info[ATTENTION_MAPS]['reduction']) == (154, 8)
    feats, reference = extractor(images())[0], plain(images())[0]
    maps = feats[ATTENTION_MAPS]
    assert maps.shape == (2, 154, 8, 16)
    # Per layer, pixel and head, the probabilities over the 77 tokens sum to one.
    torch.testing.assert_close(maps[:, :77].sum(1), torch.ones(2, 8, 16))
    torch.testing.assert_close(maps[:, 77:].sum(1), torch.ones(2, 8, 16))
    for tap in DEFAULT_TAPS:  # the attention itself is untouched: the same features
        torch.testing.assert_close(feats[tap], reference[tap], rtol=1e-4, atol=1e-5)


def test_attention_maps_replace_nothing_and_leave_no_hooks(tiny_sd):
    """diffusers' own processors and methods stay in place and every hook goes after the
    pass, so passes outside recording (denoising, other code) neither pay for nor pile up
    records."""
    extractor = StableDiffusionSource(model=tiny_sd, attention_maps=dict(strides=(32, 16)))
    fresh = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder='unet')
    default = {n: type(m.processor) for n, m in fresh.named_modules() if hasattr(m, 'processor')}
    extractor(images())
    attention = [(n, m) for n, m in extractor.unet.named_modules() if hasattr(m, 'processor')]
    assert len(attention) > 4
    for name, module in attention:
        assert type(module.processor) is default[name], name
        assert 'get_attention_scores' not in vars(module), name
    assert all(not m._forward_hooks and not m._forward_pre_hooks
               for m in extractor.unet.modules())


def test_per_variant_recipes_equal_single_variant_extractors(tiny_sd, tiny_controlnet,
                                                             tiny_loras):
    """Each variant's own timestep, denoising and noise seed give what an extractor of that
    variant alone gives; the work shared is what the recipes have in common."""
    common = dict(model=tiny_sd, prompt='a photo of a street', loras=dict(tiny_loras),
                  controlnets=dict(canny=dict(model=tiny_controlnet)))
    variants = [dict(),                                                   # t=50, call's noise
                dict(noise_seed=7),                                       # another noise
                dict(controlnets=dict(canny=1.0), denoising_from=53),     # denoised 53 -> 50
                dict(lora='a', timestep=120)]                             # another timestep
    extractor = StableDiffusionSource(variants=variants, **common)
    assert [extractor.noise_plan(variant=i) for i in range(4)] == [
        (50, 50), (50, 50), (50, 53), (120, 120)]
    assert extractor.noise_plan(30, variant=2) == (30, 53)
    assert extractor.noise_plan(0, variant=2) == (0, None)
    x = images()
    feats = extractor(x, generator=torch.Generator().manual_seed(3))
    num = x.shape[0]
    assert extractor.counts == dict(
        vae_encodes=num, noise_samples=2 * num,  # the call's noise and seed 7's
        denoising_passes=3 * num,                # variant 2 only
        controlnet_passes=4 * num,               # its three steps and its feature pass
        unet_passes=4 * num)
    for variant, ours in zip(variants, feats):
        single = StableDiffusionSource(variants=[variant], **common)
        alone = single(x, generator=torch.Generator().manual_seed(3))[0]
        for tap in DEFAULT_TAPS:  # another batch composition: tolerance
            torch.testing.assert_close(ours[tap], alone[tap], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(feats[0][DEFAULT_TAPS[0]], feats[1][DEFAULT_TAPS[0]])
    with pytest.raises(ValueError, match='Variant 1: denoising_from'):
        StableDiffusionSource(variants=[dict(), dict(denoising_from=40)], **common)
    with pytest.raises(TypeError, match='generator='):
        extractor(x, torch.Generator())


def test_independent_variant_noise(tiny_sd, tiny_controlnet):
    """variant_noise='independent': each variant its own draw (the authors' runs): two equal
    variants then differ; each equals a one-variant source given that variant's draw; a
    variant's ControlNet pass is no longer shared."""
    from mmseg_gate.sources.common.latents import PerImageNoise
    common = dict(model=tiny_sd, prompt='a photo',
                  controlnets=dict(canny=dict(model=tiny_controlnet)))
    variants = [dict(controlnets=dict(canny=1.0)), dict(controlnets=dict(canny=1.0))]
    x = images()
    noise = PerImageNoise.for_images(x, 0)
    shared = StableDiffusionSource(variants=variants, **common)
    same = shared(x, generator=noise)
    torch.testing.assert_close(same[0][DEFAULT_TAPS[0]], same[1][DEFAULT_TAPS[0]])
    assert shared.counts['controlnet_passes'] == x.shape[0]
    independent = StableDiffusionSource(variants=variants, variant_noise='independent',
                                        **common)
    apart = independent(x, generator=noise)
    assert not torch.allclose(apart[0][DEFAULT_TAPS[0]], apart[1][DEFAULT_TAPS[0]], atol=1e-3)
    counts = independent.counts
    assert counts['noise_samples'] == counts['controlnet_passes'] == 2 * x.shape[0]
    single = StableDiffusionSource(variants=variants[:1], **common)
    for i in range(2):  # variant i's draw: stream i of the image's noise
        latent = independent.vae.encode(x).latent_dist.mode() * \
            independent.vae.config.scaling_factor
        drawn = noise.draw(latent.shape, stream=i)

        class Fixed(PerImageNoise):  # hands the one-variant source exactly that draw
            def draw(self, shape, seed=None, stream=None):
                return drawn
        alone = single(x, generator=Fixed(0, noise.keys))[0]
        torch.testing.assert_close(apart[i][DEFAULT_TAPS[0]], alone[DEFAULT_TAPS[0]],
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='variant_noise'):
        StableDiffusionSource(variant_noise='fresh', **common)


def scaled_linear_alphas_cumprod(beta_start=0.00085, beta_end=0.012, steps=1000):
    """SD's noise schedule written out (the tiny model's scheduler config has these)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64)**2
    return torch.cumprod(1 - betas, dim=0)


def test_guided_denoising_equals_a_handwritten_ddim_loop(tiny_sd, tiny_controlnet, tiny_loras):
    """From t=53 down to 50 with the variant's prompt, ControlNet and LoRA, then the taps;
    the reference is DDIM written out, with no clamp. The tiny model's scheduler config has
    no ``clip_sample`` (diffusers' DDPM/DDIM default it to True, a pixel-space clamp)."""
    import json
    import os.path as osp
    config = json.load(open(osp.join(tiny_sd, 'scheduler', 'scheduler_config.json')))
    assert 'clip_sample' not in config and 'thresholding' not in config
    prompt = 'a photo of a street'
    extractor = StableDiffusionSource(
        model=tiny_sd, prompt=prompt, timestep=50, denoising_from=53,
        controlnets=dict(canny=dict(model=tiny_controlnet)), loras=dict(tiny_loras),
        variants=[dict(), dict(controlnets=dict(canny=1.0), lora='a')])
    x = images()
    ours = extractor(x, generator=torch.Generator().manual_seed(0))[1]
    assert extractor.counts['denoising_passes'] == 3 * 2 * 2

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder='vae')
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder='unet')
    unet.load_lora_adapter(tiny_loras['a'], prefix='unet', adapter_name='a')
    controlnet = ControlNetModel.from_pretrained(tiny_controlnet)
    alphas = scaled_linear_alphas_cumprod().float()
    context = extractor.embedding(1).hidden.expand(2, -1, -1)
    condition = ConditionDetector('canny')(x)
    clamped = False
    with torch.no_grad():
        latent = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        sample = alphas[53].sqrt() * latent + (1 - alphas[53]).sqrt() * noise

        def guided(sample, t):
            down, mid = controlnet(sample, t, context, controlnet_cond=condition,
                                   return_dict=False)
            return unet(sample, t, context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample

        for t in (53, 52, 51):
            eps = guided(sample, t)
            x0 = (sample - (1 - alphas[t]).sqrt() * eps) / alphas[t].sqrt()
            clamped |= bool((x0.abs() > 1).any())
            sample = alphas[t - 1].sqrt() * x0 + (1 - alphas[t - 1]).sqrt() * eps
        taps = {}
        handles = [unet.get_submodule(tap).register_forward_hook(
            lambda _m, _i, out, tap=tap: taps.__setitem__(tap, out)) for tap in DEFAULT_TAPS]
        guided(sample, 50)
    for handle in handles:
        handle.remove()
    assert clamped  # a clamp to [-1, 1] would have changed the result
    for tap in DEFAULT_TAPS:
        torch.testing.assert_close(ours[tap], taps[tap], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('lora_mode', ['fused'])
def test_fused_loras_give_the_adapters_features(gate_kwargs, lora_mode):
    adapters = StableDiffusionSource(**gate_kwargs)
    fused = StableDiffusionSource(**dict(gate_kwargs, lora_mode=lora_mode))
    assert len(fused.unets) == 3  # base + one merged copy per LoRA
    for a, b in zip(adapters(images()), fused(images())):
        for tap in a:
            torch.testing.assert_close(a[tap], b[tap], rtol=1e-4, atol=1e-5)


def test_sd21_extracts(tiny_sd21):
    extractor = StableDiffusionSource(model=tiny_sd21, prompt='a photo')
    assert not extractor.is_sdxl
    assert next(iter(extractor.prompt_embeds.values())).hidden.shape == (1, 77, 48)
    feats = extractor(images())[0]
    assert [f.shape[1] for f in feats.values()] == [64, 64, 64]


def test_sdxl_extracts_with_controlnet_and_lora(tiny_sdxl, sdxl_guidance):
    taps = ('mid_block', 'up_blocks.0.upsamplers.0', 'up_blocks.1.upsamplers.0')
    extractor = StableDiffusionSource(
        model=tiny_sdxl, prompt='a photo', taps=taps,
        controlnets=dict(canny=dict(model=sdxl_guidance['controlnet'])),
        loras=dict(a=sdxl_guidance['lora']),
        variants=[dict(), dict(lora='a'), dict(controlnets=dict(canny=1.0))])
    embed = extractor.embedding(0)
    assert embed.hidden.shape == (1, 77, 64) and embed.pooled.shape == (1, 32)  # 32 + 32
    assert [(f['reduction']) for f in extractor.feature_info] == [32, 16, 8]
    plain, lora, control = extractor(images(size=(64, 96)))
    for feats in (plain, lora, control):
        assert [tuple(f.shape) for f in feats.values()] == [(2, 64, 2, 3), (2, 64, 4, 6),
                                                             (2, 64, 8, 12)]
    assert not torch.allclose(plain['mid_block'], lora['mid_block'])
    assert not torch.allclose(plain['up_blocks.0.upsamplers.0'],
                              control['up_blocks.0.upsamplers.0'])


@pytest.mark.parametrize('arch', ['sd21', 'sdxl'])
def test_sd21_and_sdxl_train_in_a_config(arch, make_demo_cfg, tiny_sd21, tiny_sdxl,
                                         sdxl_guidance, tmp_path):
    cfg = make_demo_cfg(tmp_path, 2)
    backbone = cfg.model.backbone.source
    backbone.model = tiny_sd21 if arch == 'sd21' else tiny_sdxl
    if arch == 'sdxl':
        backbone.taps = ('mid_block', 'up_blocks.0.upsamplers.0', 'up_blocks.1.upsamplers.0')
        backbone.controlnets.canny.model = sdxl_guidance['controlnet']
        backbone.loras = dict(a=sdxl_guidance['lora'], b=sdxl_guidance['lora'])
    else:
        backbone.variants = [dict()]
        backbone.controlnets = backbone.loras = None
    runner = RUNNERS.build(cfg)
    runner.train()
    assert runner.iter == 2 and (tmp_path / 'iter_2.pth').exists()


def test_random_loras_have_the_recipe_targets(tmp_path):
    from mmengine.config import Config
    from safetensors.torch import load_file

    from mmseg_gate.testing.random_models import write_random_models
    from conftest import ROOT, lora_recipe_targets
    cfg = Config.fromfile(f'{ROOT}/configs/gate_upernet_ade20k.py')
    targets = lora_recipe_targets()
    assert len(targets) == 12
    write_random_models(cfg.model.backbone.source, str(tmp_path), 'tiny', 4, targets)
    keys = list(load_file(cfg.model.backbone.source.loras['a']))
    assert [t for t in targets if not any(f'.{t}.lora_A.' in k for k in keys)] == []
