"""The ADM source against guided-diffusion's own code (guided-diffusion-sdk, a test
dependency in the lock): its UNet's forward and output blocks, its q_sample on its linear
schedule, DDPM-segmentation's shared noise."""
import pickle

import pytest
import torch
from guided_diffusion import gaussian_diffusion, unet as gd_unet
from safetensors.torch import save_file

from mmseg_gate.sources import build_source
from mmseg_gate.sources.adm import (ADMSource, attention_levels, convert_state_dict,
                                    guided_diffusion_state_dict, output_block_modules)
from mmseg_gate.testing.architectures import TINY_ADM

ARGS = TINY_ADM  # 5 levels, attention on the coarsest 3, 8-channel heads (4-16 heads)
LEVELS = attention_levels(ARGS['image_size'], ARGS['channel_mult'],
                          ARGS['attention_resolutions'])


def guided_diffusion_unet(seed: int = 0):
    """guided-diffusion's own UNetModel as its script_util.create_model builds the LSUN
    models (resblock_updown, scale-shift norm, legacy attention order), with every weight
    non-zero (it zero-initialises output layers, which would hide mapping errors)."""
    torch.manual_seed(seed)
    size = ARGS['image_size']
    model = gd_unet.UNetModel(
        image_size=size, in_channels=3, model_channels=ARGS['model_channels'], out_channels=6,
        num_res_blocks=ARGS['num_res_blocks'],
        attention_resolutions=[size // r for r in ARGS['attention_resolutions']], dropout=0.0,
        channel_mult=ARGS['channel_mult'], num_head_channels=ARGS['num_head_channels'],
        resblock_updown=True, use_scale_shift_norm=True, use_new_attention_order=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    model = guided_diffusion_unet()
    path = tmp_path_factory.mktemp('adm') / 'lsun_tiny.pt'
    torch.save(model.state_dict(), path)  # as guided-diffusion saves its checkpoints
    return model, str(path)


def test_mapping_equals_guided_diffusions_forward(reference):
    from diffusers import UNet2DModel

    from mmseg_gate.sources.adm import diffusers_config
    model, _ = reference
    unet = UNet2DModel(**diffusers_config(**ARGS)).eval()
    unet.load_state_dict(convert_state_dict(model.state_dict(), 2, LEVELS,
                                            ARGS['num_head_channels']), strict=True)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([50, 250])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, model(x, t), rtol=1e-4, atol=1e-4)
    assert len(output_block_modules(2, LEVELS)) == len(model.output_blocks)


def test_inverse_mapping_gives_the_checkpoint_back(reference):
    from diffusers import UNet2DModel

    from mmseg_gate.sources.adm import diffusers_config
    model, _ = reference
    state = model.state_dict()
    unet = UNet2DModel(**diffusers_config(**ARGS))
    unet.load_state_dict(convert_state_dict(state, 2, LEVELS, ARGS['num_head_channels']))
    back = guided_diffusion_state_dict(unet, 2, LEVELS, ARGS['num_head_channels'])
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        assert torch.equal(back[name], value), name


def ddpm_segmentation_features(model, images, steps, blocks, seed=0):
    """DDPM-segmentation's extraction written out with guided-diffusion's own pieces: one
    shared noise from the seed, q_sample on the linear schedule, hooks on output_blocks."""
    diffusion = gaussian_diffusion.GaussianDiffusion(
        betas=gaussian_diffusion.get_named_beta_schedule('linear', 1000),
        model_mean_type=gaussian_diffusion.ModelMeanType.EPSILON,
        model_var_type=gaussian_diffusion.ModelVarType.LEARNED_RANGE,
        loss_type=gaussian_diffusion.LossType.MSE)
    noise = torch.randn(1, 3, *images.shape[-2:], generator=torch.Generator().manual_seed(seed))
    kept = {}
    hooks = [model.output_blocks[b].register_forward_hook(
        lambda _m, _i, out, b=b: kept.__setitem__(b, out)) for b in blocks]
    features = []
    with torch.no_grad():
        for t in steps:
            t = torch.full((images.shape[0], ), t)
            model(diffusion.q_sample(images, t, noise=noise.expand_as(images)), t)
            features.append(dict(kept))
    for hook in hooks:
        hook.remove()
    return features


def test_features_equal_ddpm_segmentations_extraction(reference):
    model, path = reference
    source = build_source(dict(type='ADMSource', model=path, architecture=ARGS))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = source(images)
    expected = ddpm_segmentation_features(model, images, (50, 150, 250), (5, 6, 7, 8, 12))
    assert source.variant_names == ['ADM t=50', 'ADM t=150', 'ADM t=250']
    for variant, reference_features in zip(ours, expected):
        for block, value in reference_features.items():
            torch.testing.assert_close(variant[f'output_blocks.{block}'], value, rtol=1e-4,
                                       atol=1e-4)
    info = {f['module']: (f['num_chs'], f['reduction']) for f in source.feature_info}
    assert info == {'output_blocks.5': (64, 4), 'output_blocks.6': (64, 4),
                    'output_blocks.7': (64, 4), 'output_blocks.8': (64, 2),
                    'output_blocks.12': (32, 1)}
    # Early exit: the up blocks after block 12's and the output head are freed.
    assert source.unet_taps.dropped == ['conv_norm_out', 'conv_act', 'conv_out']
    assert source.counts['unet_passes'] == 6


def test_input_scale_and_timestep(reference):
    _, path = reference
    half = ADMSource(path, architecture=ARGS, taps=(8, 12), input_scale=0.5)
    full = ADMSource(path, architecture=ARGS, taps=(8, 12))
    assert [f['reduction'] for f in half.feature_info] == [4, 2]
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    small = torch.nn.functional.interpolate(images, size=(32, 32), mode='bilinear',
                                            antialias=True)
    for a, b in zip(half(images), full(small)):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)
            assert a[name].shape[-1] == 64 // half.feature(name)['reduction']
    # A timestep given to the call holds for every variant; 0 is the clean image.
    at_zero = full(small, timestep=0)
    with torch.no_grad():
        taps = full.unet_taps.run(small, torch.tensor([0]))
    torch.testing.assert_close(at_zero[2]['output_blocks.12'], taps[full.unet_taps.taps[1]])
    with pytest.raises(ValueError, match='must be in'):
        full(small, timestep=1000)


def test_safetensors_and_state_dict_wrappers(reference, tmp_path):
    model, path = reference
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / 'adm.safetensors')
    torch.save({'state_dict': state}, tmp_path / 'wrapped.pt')
    images = torch.zeros(1, 3, 32, 32)
    expected = ADMSource(path, architecture=ARGS, taps=(12, ))(images)
    for name in ('adm.safetensors', 'wrapped.pt'):
        got = ADMSource(str(tmp_path / name), architecture=ARGS, taps=(12, ))(images)
        torch.testing.assert_close(got[0]['output_blocks.12'],
                                   expected[0]['output_blocks.12'])


def test_bad_checkpoints_are_named(reference, tmp_path):
    model, path = reference
    state = model.state_dict()
    extra = dict(state, **{'label_emb.weight': torch.zeros(1000, 128)})
    torch.save(extra, tmp_path / 'conditional.pt')
    with pytest.raises(ValueError, match=r"conditional\.pt.*no place.*label_emb"):
        ADMSource(str(tmp_path / 'conditional.pt'), architecture=ARGS)
    missing = {k: v for k, v in state.items() if k != 'output_blocks.4.1.qkv.weight'}
    torch.save(missing, tmp_path / 'missing.pt')
    with pytest.raises(ValueError, match=r"missing\.pt.*lacks 'output_blocks\.4\.1\.qkv"):
        ADMSource(str(tmp_path / 'missing.pt'), architecture=ARGS)
    with pytest.raises(ValueError, match=r"fit the ADM architecture"):
        ADMSource(path, architecture=dict(ARGS, model_channels=64))
    with open(tmp_path / 'code.pt', 'wb') as f:
        pickle.dump(dict(weights=print), f)  # an object: refused, nothing runs
    with pytest.raises(ValueError, match=r"code\.pt"):
        ADMSource(str(tmp_path / 'code.pt'), architecture=ARGS)
    with pytest.raises(FileNotFoundError, match='ddpm-segmentation'):
        ADMSource(str(tmp_path / 'absent.pt'), architecture=ARGS)
    with pytest.raises(ValueError, match='output_blocks 0..14'):
        ADMSource(str(tmp_path / 'conditional.pt'), architecture=ARGS, taps=(15, ))


def test_damaged_checkpoints_are_named(reference, tmp_path):
    """NaN weights (either format), a truncated safetensors file and a pickle under a
    .safetensors name: each an error of ours naming the file, never a silent load."""
    model, _ = reference
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state['output_blocks.3.0.in_layers.2.weight'][0, 0, 0, 0] = float('nan')
    torch.save(state, tmp_path / 'nan.pt')
    save_file(state, tmp_path / 'nan.safetensors')
    for name in ('nan.pt', 'nan.safetensors'):
        with pytest.raises(ValueError, match=rf'(?s){name}.*non-finite'):
            ADMSource(str(tmp_path / name), architecture=ARGS)
    good = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(good, tmp_path / 'whole.safetensors')
    data = (tmp_path / 'whole.safetensors').read_bytes()
    (tmp_path / 'truncated.safetensors').write_bytes(data[:len(data) // 2])
    torch.save(good, tmp_path / 'pickle.safetensors')
    for name in ('truncated.safetensors', 'pickle.safetensors'):
        with pytest.raises(ValueError, match=rf'(?s){name}.*not a readable safetensors.*'
                                             'ddpm-segmentation'):
            ADMSource(str(tmp_path / name), architecture=ARGS)
