import math

import pytest
import torch

from mmseg.registry import MODELS


def test_registered_in_mmseg():
    assert MODELS.get('GATEBackbone') is not None


@pytest.mark.parametrize('size', [(64, 64), (64, 128), (97, 75)])
def test_outputs_high_resolution_first(backbone, size):
    outs = backbone(torch.randn(2, 3, *size))
    assert backbone.out_strides == [8, 16, 32]
    assert backbone.out_channels == [64, 64, 64]  # tiny UNet's up blocks 0-2
    assert len(outs) == 3
    for out, stride, channels in zip(outs, backbone.out_strides, backbone.out_channels):
        assert out.shape == (2, channels, math.ceil(size[0] / stride),
                             math.ceil(size[1] / stride))
        assert out.dtype == torch.float32


@pytest.mark.parametrize('layout,taps', [
    ('tiny_sd', None), ('tiny_sd21', None),
    ('tiny_sdxl', ('up_blocks.0.upsamplers.0', 'up_blocks.1.attentions.0'))])
def test_early_exit_matches_full_unet_forward(layout, taps, request):
    """The taps of the stopped pass (stages after the last tap freed) equal those of
    diffusers' full forward on a freshly loaded UNet, for the SD1.x, SD2.x and SDXL
    layouts."""
    from diffusers import UNet2DConditionModel

    from mmseg_gate import StableDiffusionSource
    from mmseg_gate.sources.common.taps import first_tensor
    folder = request.getfixturevalue(layout)
    extractor = StableDiffusionSource(model=folder, prompt='a photo',
                                     **(dict(taps=taps) if taps else {}))
    assert extractor.dropped_stages and 'conv_out' in extractor.dropped_stages
    latents = torch.randn(1, 4, 8, 16)
    embed = extractor.embedding(0)
    added = None
    if extractor.is_sdxl:
        added = dict(text_embeds=embed.pooled,
                     time_ids=torch.tensor([[64., 128., 0., 0., 64., 128.]]))
    truncated = extractor.taps[None](latents, 50, embed.hidden, added_cond_kwargs=added)

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder='unet')
    full = {}
    handles = [unet.get_submodule(t).register_forward_hook(
        lambda _m, _i, out, t=t: full.__setitem__(t, first_tensor(out))) for t in truncated]
    with torch.no_grad():
        unet(latents, 50, embed.hidden, added_cond_kwargs=added)
    for handle in handles:
        handle.remove()
    for tap, feat in truncated.items():  # two call paths: tolerance
        torch.testing.assert_close(feat, full[tap], rtol=1e-5, atol=1e-6, msg=tap)
    with pytest.raises(ValueError, match='multiples'):  # freed stages need whole halvings
        extractor.taps[None](torch.randn(1, 4, 8, 10), 50, embed.hidden,
                             added_cond_kwargs=added)


def test_unet_stops_after_last_tapped_block(backbone):
    """Up block 3 and the output head never run, so they are not even kept."""
    extractor = backbone.source
    assert extractor.stages_run[-1] == 'up_blocks.2'
    assert extractor.dropped_stages == ['up_blocks.3', 'conv_norm_out', 'conv_act', 'conv_out']
    assert len(extractor.unet.up_blocks) == 3 and extractor.unet.conv_out is None
    backbone(torch.randn(1, 3, 64, 64))


def test_refinement_starts_as_identity(backbone):
    from mmseg_gate.sources.common.latents import PerImageNoise
    x = torch.randn(1, 3, 64, 64)
    images = backbone.to_vae_range(x)
    raw = backbone.source(images, generator=PerImageNoise.for_images(images, 0))
    outs = backbone(x)
    for out, name in zip(outs, backbone.out_names):
        assert torch.equal(out, raw[0][name].float())


def test_diffusion_weights_frozen_through_a_training_step(backbone):
    backbone.train()
    unet = backbone.source.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    trainable = list(backbone.parameters())
    assert trainable and all(p.requires_grad for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        loss = sum(o.square().mean() for o in backbone(torch.randn(2, 3, 64, 64)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in unet.parameters())
    assert all(p.grad is None for p in backbone.source.vae.parameters())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_checkpoint_holds_only_trainable_parts(backbone):
    keys = list(backbone.state_dict())
    assert keys and all(k.startswith('fusion.refiners.') for k in keys)
    frozen = sum(p.numel() for p in backbone.source.unet.parameters())
    assert sum(p.numel() for p in backbone.parameters()) < frozen


def test_init_weights_leaves_diffusion_weights_alone(tiny_sd):
    from mmseg_gate import GATEBackbone
    model = GATEBackbone(source=dict(model=tiny_sd),
                         init_cfg=dict(type='Kaiming', layer='Conv2d'))
    before = {k: v.clone() for k, v in model.source.unet.state_dict().items()}
    model.init_weights()
    assert all(torch.equal(before[k], v) for k, v in model.source.unet.state_dict().items())
    # The refinement blocks are still the identity after a Kaiming init of their convs,
    # each level its own block with trainable non-zero convolutions (the authors' ResBlock
    # zero-initialises every weight and `[ResBlock] * n` shares one: docs/segmentation.md).
    blocks = [block for stack in model.fusion.refiners for block in stack]
    assert blocks and len({id(block) for block in blocks}) == len(blocks)
    for block in blocks:
        assert torch.all(block.conv2.norm.weight == 0)
        assert block.conv1.conv.weight.abs().sum() > 0 and block.conv2.conv.weight.abs().sum() > 0


def test_deterministic_with_seed(backbone, tiny_sd):
    x = torch.randn(1, 3, 64, 64)
    first, second = backbone(x), backbone(x)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    backbone.noise_seed = 1
    other = backbone(x)
    assert not torch.equal(first[0], other[0])


def test_eval_noise_is_per_image_and_independent_of_the_batch(backbone):
    """Eval noise: each image's own (from its pixels), the same in any batch or position;
    another image gets another noise field, also where their pixels are alike."""
    from mmseg_gate.sources.common.latents import PerImageNoise
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    noise = PerImageNoise.for_images(images, 0)
    together = noise.draw((3, 4, 4, 4))
    alone = [PerImageNoise.for_images(images[i:i + 1], 0).draw((1, 4, 4, 4)) for i in (2, 0)]
    assert torch.equal(together[2:3], alone[0]) and torch.equal(together[0:1], alone[1])
    assert not torch.allclose(together[0], together[1], atol=0.5)
    twin = images[1:2].clone()
    twin[0, 0, 0, 0] = -twin[0, 0, 0, 0]  # one pixel differs: another image, another noise
    assert not torch.allclose(PerImageNoise.for_images(twin, 0).draw((1, 4, 4, 4)),
                              together[1:2], atol=0.5)
    # The backbone's forward: an image's outputs do not depend on its batch.
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    batched = backbone(x)
    single = backbone(x[1:])
    for a, b in zip(batched, single):
        torch.testing.assert_close(a[1:], b, rtol=1e-4, atol=1e-4)
    # (Other processes draw the same: tests/test_store.py's two-process extraction.)


def test_fresh_eval_noise_as_the_authors(backbone):
    """eval_noise='fresh': new noise at every forward in eval mode too (their img2img
    noising at test time); the default repeats."""
    x = torch.randn(1, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(backbone(x), backbone(x)))
    backbone.eval_noise = 'fresh'
    first, second = backbone(x), backbone(x)
    assert not torch.equal(first[0], second[0])
    with pytest.raises(ValueError, match='eval_noise'):
        type(backbone)(source=dict(model='unused'), eval_noise='sample')


def test_training_noise_differs_per_step_but_repeats_per_run(backbone):
    import copy
    x = torch.randn(1, 3, 64, 64)
    run_a, run_b = copy.deepcopy(backbone).train(), copy.deepcopy(backbone).train()
    a1 = run_a.source(x, generator=run_a._noise(x))
    a2 = run_a.source(x, generator=run_a._noise(x))
    b1 = run_b.source(x, generator=run_b._noise(x))
    tap = run_a.out_names[0]
    assert not torch.equal(a1[0][tap], a2[0][tap])
    assert torch.equal(a1[0][tap], b1[0][tap])


def test_deepcopy_shares_frozen_parts(backbone):
    import copy
    clone = copy.deepcopy(backbone)
    assert clone.source is backbone.source
    assert clone.fusion.refiners[0] is not backbone.fusion.refiners[0]


def test_vae_decoder_not_kept(backbone):
    assert backbone.source.vae.decoder is None


def test_normalisation_is_undone(backbone, tiny_sd):
    """The same pixels normalised two ways give the same features."""
    pixels = torch.rand(1, 3, 64, 64) * 255
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    from mmseg_gate import GATEBackbone
    imagenet = GATEBackbone(source=dict(model=tiny_sd, prompt='a photo of a street'),
                            input_mean=mean, input_std=std).eval()
    imagenet.load_state_dict(backbone.state_dict())
    a = backbone((pixels - 127.5) / 127.5)
    b = imagenet((pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a, b))


def test_low_precision_frozen_parts(tiny_sd, backbone):
    """bfloat16 frozen parts (float16's CPU stand-in) give float32 outputs close to fp32's."""
    from mmseg_gate import GATEBackbone
    low = GATEBackbone(source=dict(model=tiny_sd, prompt='a photo of a street',
                                   frozen_dtype='bfloat16')).eval()
    low.load_state_dict(backbone.state_dict())
    x = torch.randn(1, 3, 64, 64)
    outs, ref = low(x), backbone(x)
    assert low.source.unet.dtype == torch.bfloat16
    for out, expected in zip(outs, ref):
        assert out.dtype == torch.float32
        assert (out - expected).abs().mean() < 0.1 * expected.abs().mean()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_segmentor_in_half_precision(make_demo_cfg, tmp_path, dtype):
    """``model.half()`` / ``.to(dtype)``: the trainable parts and heads run in that dtype,
    the frozen parts in their own (``frozen_dtype``)."""
    from mmseg.registry import MODELS
    model = MODELS.build(make_demo_cfg(tmp_path, 1).model).eval().to(dtype)
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 96), mode='tensor')
    assert logits.dtype == dtype and logits.shape[:2] == (1, 5)
    assert torch.isfinite(logits).all()
    assert model.backbone.source.unet.dtype == torch.float32  # CPU: frozen_dtype auto


def test_to_device_places_frozen_parts(tiny_sd):
    """``.to(device)``/``.cuda()`` moves the frozen parts right away (in ``frozen_dtype``),
    not on the first forward. ('meta' stands in for an accelerator here.)"""
    from mmseg_gate import GATEBackbone
    model = GATEBackbone(source=dict(model=tiny_sd)).to('meta')
    for part in (model.source.unet, model.source.vae):
        assert part.device.type == 'meta' and part.dtype == torch.float16  # auto: fp16
    assert all(e.hidden.device.type == 'meta' for e in model.source.prompt_embeds.values())
