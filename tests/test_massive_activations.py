"""DiTF's treatment of massive activations on the DiT sources, and noise ensembles on every
source kind: the AdaLN treatment against LayerNorm and AdaLN parameters computed by hand
from diffusers' own modules, 'auto' channel discard against planted massive channels, and
an ensemble against the mean of its single draws."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from diffusers import (FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from safetensors.torch import load_file, save_file

from mmseg_gate.sources import build_source
from mmseg_gate.sources.common.latents import PerImageNoise
from mmseg_gate.testing.architectures import TINY_ADM
from mmseg_gate.testing.dit_architectures import save_random_flux, save_random_sd3

PLANTED = [5, 21]
# Where each family's residual stream starts: a bias there is a constant in every token.
STREAM_START = dict(sd3='pos_embed.proj.bias', flux='x_embedder.bias')
RAW = dict(tap_transform='raw', discard_channels=None)


@pytest.fixture(scope='module')
def planted(tmp_path_factory):
    """Tiny SD3 and FLUX whose residual streams carry two massive channels (a large bias
    where the stream starts), as FLUX.1-dev's 154 and 1446."""
    root = tmp_path_factory.mktemp('massive')
    folders = {}
    for kind, save in (('sd3', save_random_sd3), ('flux', save_random_flux)):
        folder = save(str(root / kind))
        weights = f'{folder}/transformer/diffusion_pytorch_model.safetensors'
        state = load_file(weights)
        state[STREAM_START[kind]][PLANTED] += 1e4
        save_file(state, weights)
        folders[kind] = folder
    return folders


def _images(n=2, seed=1):
    return torch.rand(n, 3, 64, 80, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _by_hand(kind, folder, raw_map, tap, next_norm, timestep, prompt, discarded):
    """(1 + scale) * LayerNorm(x) + shift from the next AdaLN's own linear layer on the
    transformer's time(-guidance)-text embedding, computed here from diffusers' modules."""
    cls = SD3Transformer2DModel if kind == 'sd3' else FluxTransformer2DModel
    transformer = cls.from_pretrained(folder, subfolder='transformer').eval()
    n = raw_map.shape[0]
    with torch.no_grad():
        if kind == 'sd3':
            pipe = StableDiffusion3Pipeline.from_pretrained(folder, transformer=None)
            _, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt,
                                                 do_classifier_free_guidance=False)
            temb = transformer.time_text_embed(torch.full((n, ), float(timestep)),
                                               pooled.expand(n, -1))
        else:
            pipe = FluxPipeline.from_pretrained(folder, transformer=None)
            _, pooled, _ = pipe.encode_prompt(prompt, prompt)
            temb = transformer.time_text_embed(torch.full((n, ), float(timestep)),
                                               torch.full((n, ), 3500.0),
                                               pooled.expand(n, -1))
        norm = transformer.get_submodule(next_norm)
        emb = norm.linear(F.silu(temb))
        if next_norm == 'norm_out':  # AdaLayerNormContinuous: scale first
            scale, shift = emb.chunk(2, dim=1)
        else:  # AdaLayerNormZero(Single): shift, scale, gate, ...
            shift, scale = emb.chunk(6 if next_norm.endswith('norm1') else 3, dim=1)[:2]
    tokens = raw_map.flatten(2).transpose(1, 2).clone()
    tokens[..., discarded] = 0
    normed = F.layer_norm(tokens, (tokens.shape[-1], ), eps=1e-6)
    out = normed * (1 + scale[:, None]) + shift[:, None]
    return out.transpose(1, 2).reshape(raw_map.shape)


@pytest.mark.parametrize('kind,taps,norms', [
    ('sd3', ('transformer_blocks.0', 'transformer_blocks.2'),
     ('transformer_blocks.1.norm1', 'norm_out')),
    ('flux', ('transformer_blocks.1', 'single_transformer_blocks.0'),
     ('single_transformer_blocks.0.norm', 'single_transformer_blocks.1.norm'))])
def test_adaln_treatment_equals_layernorm_and_adaln_by_hand(planted, kind, taps, norms):
    common = dict(type='DiTSource', model=planted[kind], prompt='a photo of a cat', taps=taps,
                  timestep=260, timestep_shift=False)
    treated = build_source(common)  # the default: AdaLN, channels found
    raw = build_source(dict(common, **RAW))
    images = _images()
    ours = treated(images, generator=torch.Generator().manual_seed(0))[0]
    before = raw(images, generator=torch.Generator().manual_seed(0))[0]
    assert treated.discarded == {tap: PLANTED for tap in taps}
    for tap, norm in zip(taps, norms):
        # Raw, the planted channels dominate every token; treated, they are gone.
        assert before[tap][:, PLANTED].abs().min() > 1e3
        expected = _by_hand(kind, planted[kind], before[tap], tap, norm, 260,
                            'a photo of a cat', PLANTED)
        torch.testing.assert_close(ours[tap], expected, rtol=1e-4, atol=1e-4)
        assert ours[tap].abs().max() < 100
    # The treatment needs no pass beyond the last tap: the blocks after it stay freed.
    stream, index = taps[-1].rsplit('.', 1)
    assert len(getattr(treated.transformer, stream)) == int(index) + 1


def test_auto_discard_finds_the_planted_channels_and_lists_are_taken(planted):
    tap = ('single_transformer_blocks.1', )
    source = build_source(dict(type='DiTSource', model=planted['flux'], taps=tap))
    assert source.discarded is None  # found on the first call, on the fixed probe
    assert source.find_massive_channels() == {tap[0]: PLANTED}
    assert source.counts == {}  # the probe is not counted as work
    fixed = build_source(dict(type='DiTSource', model=planted['flux'], taps=tap,
                              discard_channels=[5], tap_transform='raw'))
    out = fixed(_images(1))[0][tap[0]]
    assert (out[:, 5] == 0).all() and out[:, 21].abs().min() > 1e3
    with pytest.raises(ValueError, match="tap_transform must be one of"):
        build_source(dict(type='DiTSource', model=planted['flux'], tap_transform='ln'))
    with pytest.raises(ValueError, match="discard_channels must be 'auto'"):
        build_source(dict(type='DiTSource', model=planted['flux'], discard_channels='all'))
    with pytest.raises(ValueError, match='ensemble_size must be a positive integer'):
        build_source(dict(type='DiTSource', model=planted['flux'], ensemble_size=0))


def test_timestep_shift_off_is_sigma_t_over_1000(planted):
    """DiTF's noise level: sigma = t / 1000 exactly, not img2img's shifted schedule."""
    common = dict(type='DiTSource', model=planted['flux'], taps=('transformer_blocks.0', ),
                  timestep=260, **RAW)
    exact = build_source(dict(common, timestep_shift=False))
    shifted = build_source(common)
    images = _images(1)
    seen = {}
    exact.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.update(kwargs), with_kwargs=True)
    exact(images, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(seen['timestep'], torch.tensor([0.26]))
    latents = seen['hidden_states']
    clean = exact.vae.encode(images).latent_dist.mode()
    clean = (clean - exact.vae.config.shift_factor) * exact.vae.config.scaling_factor
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    mixed = 0.74 * clean + 0.26 * noise
    n, c, h, w = mixed.shape  # FLUX's 2x2 packing, written out
    packed = mixed.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(
        n, h // 2 * w // 2, c * 4)
    torch.testing.assert_close(latents, packed, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(exact(images)[0]['transformer_blocks.0'],
                              shifted(images)[0]['transformer_blocks.0'])


def _keys_of_draw(noise, draw):
    return PerImageNoise(noise.seed, [k if draw == 0 else f'{k}#draw{draw}' for k in noise.keys])


@pytest.mark.parametrize('kind', ['sd', 'adm', 'dit'])
def test_an_ensemble_is_the_mean_of_its_single_draws(kind, tiny, planted):
    """Every noisy source averages ``ensemble_size`` draws per image, the image encoded
    once: the mean of the same draws extracted one at a time."""
    cfg = dict(sd=dict(type='StableDiffusionSource', model=tiny['sd_model'], prompt='a photo',
                       timestep=300),
               adm=dict(type='ADMSource', model=tiny['adm'], architecture=TINY_ADM,
                        taps=(4, 6), steps=(100, ), share_noise=False),
               dit=dict(type='DiTSource', model=planted['sd3'], taps=('transformer_blocks.1', ),
                        timestep=300, **RAW))[kind]
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    noise = PerImageNoise(7, ['first', 'second'])
    ensemble = build_source(dict(cfg, ensemble_size=3))
    single = build_source(cfg)
    together = ensemble(images, generator=noise)[0]
    apart = [single(images, generator=_keys_of_draw(noise, d))[0] for d in range(3)]
    for name, value in together.items():
        mean = torch.stack([a[name] for a in apart]).mean(0)
        torch.testing.assert_close(value, mean, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(value, apart[0][name], atol=1e-3)
    if kind != 'adm':
        assert ensemble.counts['vae_encodes'] == 2 and ensemble.counts['noise_samples'] == 6
    with pytest.raises(ValueError, match='share_noise=False'):
        build_source(dict(type='ADMSource', model=tiny['adm'], architecture=TINY_ADM,
                          ensemble_size=2))


def test_the_store_records_the_dit_treatment(planted, tmp_path):
    """A store's header holds the options a source records even when a config leaves them
    to their defaults, so a store of raw taps is never read as treated ones."""
    from mmseg_gate.store.manifest import make_header
    folder = tmp_path / 'flux'
    shutil.copytree(planted['flux'], folder)
    header, _ = make_header(dict(type='DiTSource', model=str(folder)), 0, 'float32')
    assert header['source']['tap_transform'] == 'adaln'
    assert header['source']['discard_channels'] == 'auto'
    raw, _ = make_header(dict(type='DiTSource', model=str(folder), **RAW), 0, 'float32')
    assert raw['source']['tap_transform'] == 'raw'
    sd, _ = make_header(dict(type='StableDiffusionSource', model='x'), 0, 'float32')
    assert 'ensemble_size' not in sd['source']  # defaults that never changed stay out
