"""GATE's guidance: ControlNet, LoRA adapters, shared work across variants, amalgamation."""
import json
import re
import os.path as osp

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmseg_gate import GATEBackbone
from mmseg_gate.sources.common.conditions import ConditionDetector

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def images(seed=0, size=(64, 96)):
    """Smooth images with edges (so Canny finds something), in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2, 3, 4, 6, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode='nearest')


def variant_feats(backbone, x):
    backbone.eval()
    feats = backbone.source(backbone.to_vae_range(x),
                               generator=torch.Generator().manual_seed(0))
    return [list(variant.values()) for variant in feats]


@pytest.fixture(scope='module')
def gate(gate_kwargs):
    return GATEBackbone(source=gate_kwargs)


def test_controlnet_scale_zero_is_prompt_only(gate_kwargs):
    model = GATEBackbone(source=dict(gate_kwargs, variants=[
        dict(), dict(controlnets=dict(canny=0.0)), dict(controlnets=dict(canny=1.0))]))
    plain, zero, full = variant_feats(model, images())
    # Rows of one UNet batch: equal up to float rounding (kernels may differ per row).
    for a, b in zip(plain, zero):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain[0], full[0], rtol=1e-3, atol=1e-4)


def test_lora_scale_zero_is_prompt_only_and_lora_changes_features(gate_kwargs):
    model = GATEBackbone(source=dict(gate_kwargs, variants=[
        dict(), dict(lora='a', lora_scale=0.0), dict(lora='a'), dict(lora='b'),
        dict(lora='a', lora_scale=0.5)]))
    plain, zero, lora_a, lora_b, half_a = variant_feats(model, images())
    for a, b in zip(plain, zero):  # rows of one batch: equal up to float rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def differ(a, b):
        return not torch.allclose(a, b, rtol=1e-3, atol=1e-4)

    assert differ(plain[0], lora_a[0]) and differ(lora_a[0], lora_b[0])
    assert differ(half_a[0], lora_a[0]) and differ(half_a[0], plain[0])


def test_guided_variants_equal_single_variant_backbones(gate_kwargs, gate):
    """Each variant, run in the shared batch, gives what a backbone with only it gives."""
    batched = variant_feats(gate, images())
    for i, variant in enumerate(gate_kwargs['variants']):
        alone = variant_feats(GATEBackbone(source=dict(gate_kwargs, variants=[variant])), images())
        for a, b in zip(batched[i], alone[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_one_batch_equals_one_variant_at_a_time(gate_kwargs, gate):
    sequential = GATEBackbone(source=dict(gate_kwargs, batch_variants=False))
    for a_feats, b_feats in zip(variant_feats(gate, images()),
                                variant_feats(sequential, images())):
        for a, b in zip(a_feats, b_feats):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_shared_work_runs_once_per_image(gate):
    extractor = gate.source
    calls = {'vae_encoder': 0, 'controlnet': 0, 'unet_batches': 0}

    def counter(name):
        return lambda *_: calls.__setitem__(name, calls[name] + 1)

    handles = [extractor.vae.encoder.register_forward_hook(counter('vae_encoder')),
               extractor.controlnets['canny'].register_forward_hook(counter('controlnet')),
               extractor.unet.conv_in.register_forward_hook(counter('unet_batches'))]
    extractor.counts.clear()
    gate.eval()(images())
    for handle in handles:
        handle.remove()
    # Three variants, two images: one VAE call, one ControlNet call, one UNet batch.
    assert calls == {'vae_encoder': 1, 'controlnet': 1, 'unet_batches': 1}
    assert extractor.counts['vae_encodes'] == 2
    assert extractor.counts['controlnet_passes'] == 2
    assert extractor.counts['unet_passes'] == 6


def test_gradients_reach_only_trainable_parts(gate):
    model = gate.train()
    loss = sum(o.square().mean() for o in model(images()))
    loss.backward()
    extractor = model.source
    frozen = [*extractor.unet.parameters(), *extractor.vae.parameters(),
              *extractor.controlnets['canny'].parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    trainable = dict(model.named_parameters())
    assert all(k.startswith(('fusion.amalgamations.', 'fusion.refiners.')) for k in trainable)
    assert any(k.startswith('fusion.amalgamations.') and p.grad is not None
               for k, p in trainable.items())
    model.zero_grad()


def test_amalgamation_weights_are_softmaxed_per_channel(gate):
    gate.eval()(images())
    weights = gate.fusion.amalgamations[0].last_weights  # (assigners, variants, batch, channels)
    assert weights.shape[:3] == (1, 3, 2)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones_like(weights[:, 0]))


def test_several_assigners_concatenate(gate_kwargs):
    model = GATEBackbone(source=gate_kwargs, num_assigners=2).eval()
    assert model.out_channels == [128, 128, 128]
    assert [o.shape[1] for o in model(images())] == [128, 128, 128]


def test_kohya_locon_file_loads_like_diffusers_format(gate_kwargs, tiny_loras, tmp_path):
    """The same weights in kohya's key format (attention and conv layers, alpha = rank / 2)
    give the features of our file (alpha = rank) at LoRA scale 0.5: keys and alphas land."""
    kohya = {}
    for key, value in load_file(tiny_loras['a']).items():
        module, kind = re.match(r'unet\.(.+)\.lora_(A|B)\.weight$', key).groups()
        name = 'lora_unet_' + module.replace('.', '_')
        kohya[f"{name}.lora_{dict(A='down', B='up')[kind]}.weight"] = value
        if kind == 'A':
            kohya[f'{name}.alpha'] = torch.tensor(value.shape[0] / 2)
    assert any('resnets' in k and 'conv1' in k for k in kohya)  # LoCon layers included
    path = str(tmp_path / 'kohya.safetensors')
    save_file(kohya, path)
    ours = variant_feats(GATEBackbone(source=dict(gate_kwargs, variants=[
        dict(lora='a', lora_scale=0.5)])), images())
    theirs = variant_feats(GATEBackbone(source=dict(gate_kwargs, loras=dict(a=path),
                                               variants=[dict(lora='a')])), images())
    for a, b in zip(ours[0], theirs[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_class_names_are_appended(gate_kwargs):
    model = GATEBackbone(source=dict(gate_kwargs, class_names='ade20k', append_class_names=True))
    (prompt, _), = model.source.prompt_embeds
    embeds = model.source.embedding(0)
    assert prompt.startswith('a photo of a street wall, building, sky')
    assert embeds.hidden.shape[1] > 77  # 150 class names need several 77-token chunks


def test_missing_lora_file_says_how_to_make_it(gate_kwargs, tmp_path):
    with pytest.raises(FileNotFoundError, match='(?s)tools/train_lora.py.*_prompt.py'):
        GATEBackbone(source=dict(gate_kwargs, loras=dict(a=str(tmp_path / 'x.safetensors'),
                                                    b=str(tmp_path / 'y.safetensors'))))


def test_lora_of_another_unet_is_rejected(gate_kwargs, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from mmseg_gate.sources.common.lora import save_lora_file
    other = UNet2DConditionModel(
        block_out_channels=(64, 64, 128, 128), layers_per_block=1, cross_attention_dim=32,
        norm_num_groups=16, sample_size=16,
        down_block_types=('CrossAttnDownBlock2D', ) * 3 + ('DownBlock2D', ),
        up_block_types=('UpBlock2D', ) + ('CrossAttnUpBlock2D', ) * 3)
    other.add_adapter(LoraConfig(r=4, target_modules=['to_q', 'conv1']))
    path = save_lora_file(other, str(tmp_path / 'other.safetensors'))
    with pytest.raises(ValueError, match='does not fit this UNet'):
        GATEBackbone(source=dict(gate_kwargs, loras=dict(a=path, b=path)))


def test_controlnet_for_another_unet_is_rejected(gate_kwargs, tmp_path):
    from diffusers import ControlNetModel
    ControlNetModel(block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                    cross_attention_dim=64, norm_num_groups=16,
                    down_block_types=('CrossAttnDownBlock2D', ) * 3 + ('DownBlock2D', )
                    ).save_pretrained(tmp_path / 'cn')
    bad = dict(canny=dict(model=str(tmp_path / 'cn'), condition=dict(type='canny')))
    with pytest.raises(ValueError, match='cross_attention_dim is 64 but the UNet has 32'):
        GATEBackbone(source=dict(gate_kwargs, controlnets=bad))


def test_detector_without_weights_fails_clearly():
    with pytest.raises(FileNotFoundError, match="(?s)'hed' needs its weights.*Annotators"):
        ConditionDetector(type='hed')


def test_canny_condition_matches_opencv_at_input_size():
    import cv2
    import numpy as np
    x = images(size=(64, 128))
    cond = ConditionDetector(type='canny')(x)
    assert cond.shape == (2, 3, 64, 128)
    pixels = ((x[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    expected = cv2.Canny(np.ascontiguousarray(pixels), 100, 200) / 255.0
    assert torch.equal(cond[0, 0], torch.from_numpy(expected).float())


def test_train_lora_lowers_loss_and_its_output_loads(tiny_sd, gate_kwargs, tmp_path,
                                                     run_tool_here):
    from mmseg_gate.testing.demo_data import write_ade_layout_dataset
    root = tmp_path / 'ade'
    write_ade_layout_dataset(str(root), num_train=4, num_val=0)
    work = tmp_path / 'lora'
    work.mkdir()
    (work / 'lora_step9.safetensors.gate-tmp').write_bytes(b'left by a killed run')
    options = [f'model={tiny_sd}', f'image_dir={root}/images/training', f'work_dir={work}',
               'num_images=4', 'steps=40', 'save_every=20', 'log_every=10', 'batch_size=4',
               'unet_lr=3e-3']
    result = run_tool_here('train_lora', osp.join(ROOT, 'configs', 'lora', 'demo.py'),
                           '--cfg-options', *options)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [e['loss'] for e in json.load(open(work / 'log.json'))['losses']]
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    assert (work / 'lora_step20.safetensors').exists()
    assert not list(work.glob('*.gate-tmp'))
    saved = load_file(str(work / 'lora_step20.safetensors'))
    assert any('attn1.to_q.lora_A' in k for k in saved)  # attention LoRA kept
    model = GATEBackbone(source=dict(gate_kwargs,
                                     loras=dict(a=str(work / 'lora_step40.safetensors'),
                                                b=str(work / 'lora_step20.safetensors'))))
    plain, lora_a, lora_b = variant_feats(model, images())
    assert not torch.allclose(lora_a[0], lora_b[0])
