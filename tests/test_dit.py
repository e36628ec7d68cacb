"""Diffusion-transformer sources (SD3, FLUX) against diffusers' own pipelines: the img2img
pipelines' noising and latent layout, and block outputs read by a hook on diffusers' full
forward of a freshly loaded transformer."""
import numpy as np
import pytest
import torch
from diffusers import (FluxImg2ImgPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Img2ImgPipeline)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from PIL import Image

from mmseg_gate.sources import build_source
from mmseg_gate.testing.dit_architectures import save_random_flux, save_random_sd3

# The block outputs as they are, which the references below read (the sources' default is
# DiTF's AdaLN treatment; see test_massive_activations.py).
RAW = dict(tap_transform='raw', discard_channels=None)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp('dit')
    return dict(sd3=save_random_sd3(str(root / 'sd3')),
                flux=save_random_flux(str(root / 'flux')))


def _reference(kind, folder, images, taps, timestep, prompt, seed=0, lora=None,
               controlnet=None, controlnet_scale=1.0):
    """What diffusers computes: the img2img pipeline's timesteps (its own schedule and
    get_timesteps) and noising (its scheduler's scale_noise) of the VAE posterior's mode
    (the pipelines sample it; features use the mode), FLUX's token packing and ids (the
    pipeline's own), then a full forward of a fresh transformer, hooked."""
    pipe_class = StableDiffusion3Img2ImgPipeline if kind == 'sd3' else FluxImg2ImgPipeline
    pipe = pipe_class.from_pretrained(folder)
    n = images.shape[0]
    height, width = images.shape[-2:]
    if kind == 'sd3':
        pipe.scheduler.set_timesteps(1000)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt,
                                                  do_classifier_free_guidance=False)
    else:
        seq = (height // 16) * (width // 16)
        mu = calculate_shift(seq, pipe.scheduler.config.base_image_seq_len,
                             pipe.scheduler.config.max_image_seq_len,
                             pipe.scheduler.config.base_shift, pipe.scheduler.config.max_shift)
        retrieve_timesteps(pipe.scheduler, 1000, 'cpu',
                           sigmas=np.linspace(1.0, 1 / 1000, 1000), mu=mu)
        embeds, pooled, text_ids = pipe.encode_prompt(prompt, prompt)
    timesteps, _ = pipe.get_timesteps(1000, timestep / 1000, 'cpu')
    t = timesteps[:1].repeat(n)
    generator = torch.Generator().manual_seed(seed)
    image = pipe.image_processor.preprocess((images + 1) / 2)  # back to [-1, 1], as given
    with torch.no_grad():
        clean = pipe.vae.encode(image).latent_dist.mode()
    clean = (clean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    latents = pipe.scheduler.scale_noise(clean, t, torch.randn(clean.shape,
                                                               generator=generator))
    if kind == 'flux':
        _, c, h, w = latents.shape
        latents = pipe._pack_latents(latents, n, c, h, w)
        image_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, 'cpu', torch.float32)
    transformer_class = SD3Transformer2DModel if kind == 'sd3' else FluxTransformer2DModel
    transformer = transformer_class.from_pretrained(folder, subfolder='transformer').eval()
    if lora is not None:  # diffusers' own loading of the file
        pipe.transformer = transformer
        pipe.load_lora_weights(lora)
    residuals = {}
    if controlnet is not None:  # a Canny map of the image, VAE-encoded, through it
        import cv2
        from diffusers import FluxControlNetModel, SD3ControlNetModel
        pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        edges = [cv2.Canny(np.ascontiguousarray(p.permute(1, 2, 0).numpy()), 100, 200)
                 for p in pixels]
        cond = torch.from_numpy(np.stack(edges)).float()[:, None].repeat(1, 3, 1, 1) / 255
        with torch.no_grad():
            control = pipe.vae.encode(cond * 2 - 1).latent_dist.mode()
            if kind == 'sd3':  # InstantX's kind: no shift, zero pooled projection
                net = SD3ControlNetModel.from_pretrained(controlnet).eval()
                residuals['block_controlnet_hidden_states'] = net(
                    hidden_states=latents, timestep=t,
                    encoder_hidden_states=embeds.expand(n, -1, -1),
                    pooled_projections=torch.zeros_like(pooled).expand(n, -1),
                    controlnet_cond=control * pipe.vae.config.scaling_factor,
                    conditioning_scale=controlnet_scale, return_dict=False)[0]
            else:
                net = FluxControlNetModel.from_pretrained(controlnet).eval()
                control = (control - pipe.vae.config.shift_factor) * \
                    pipe.vae.config.scaling_factor
                _, c, h, w = control.shape
                double, single = net(
                    hidden_states=latents, controlnet_cond=pipe._pack_latents(control, n, c, h, w),
                    conditioning_scale=controlnet_scale, timestep=t / 1000,
                    guidance=torch.full((n, ), 3.5),
                    pooled_projections=pooled.expand(n, -1),
                    encoder_hidden_states=embeds.expand(n, -1, -1), txt_ids=text_ids,
                    img_ids=image_ids, return_dict=False)
                residuals.update(controlnet_block_samples=double,
                                 controlnet_single_block_samples=single)
    kept = {}
    for tap in taps:
        transformer.get_submodule(tap).register_forward_hook(
            lambda _m, _i, out, tap=tap: kept.__setitem__(tap, out[1]))
    with torch.no_grad():
        if kind == 'sd3':
            transformer(hidden_states=latents, timestep=t,
                        encoder_hidden_states=embeds.expand(n, -1, -1),
                        pooled_projections=pooled.expand(n, -1), **residuals)
        else:
            transformer(hidden_states=latents, timestep=t / 1000,
                        guidance=torch.full((n, ), 3.5),
                        pooled_projections=pooled.expand(n, -1),
                        encoder_hidden_states=embeds.expand(n, -1, -1), txt_ids=text_ids,
                        img_ids=image_ids, **residuals)
    grid = (height // 16, width // 16)
    return {tap: value.transpose(1, 2).reshape(n, -1, *grid) for tap, value in kept.items()}


@pytest.mark.parametrize('kind,taps', [
    ('sd3', ('transformer_blocks.0', 'transformer_blocks.1')),
    ('flux', ('transformer_blocks.1', 'single_transformer_blocks.0'))])
def test_taps_equal_diffusers_hooked_forward(models, kind, taps):
    source = build_source(dict(type='DiTSource', model=models[kind], prompt='a photo of a cat',
                               taps=taps, timestep=300, **RAW))
    images = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = source(images, generator=torch.Generator().manual_seed(0))[0]
    expected = _reference(kind, models[kind], images, taps, 300, 'a photo of a cat')
    for tap in taps:
        assert ours[tap].shape == expected[tap].shape == (2, 32, 4, 5)
        torch.testing.assert_close(ours[tap], expected[tap], rtol=1e-4, atol=1e-4)
    # Early exit: the blocks after the last tap are freed.
    if kind == 'sd3':
        assert len(source.transformer.transformer_blocks) == 2
    else:
        assert len(source.transformer.single_transformer_blocks) == 1


def test_taps_and_variants_are_checked(models):
    with pytest.raises(KeyError, match='text tokens are not a spatial map'):
        build_source(dict(type='DiTSource', model=models['sd3'],
                          taps=('transformer_blocks.1.attn', )))
    with pytest.raises(ValueError, match="LoRA 'b' is not one of the `loras`"):
        build_source(dict(type='DiTSource', model=models['sd3'], variants=[dict(lora='b')]))
    with pytest.raises(ValueError, match=r"ControlNets \['canny'\] are not in"):
        build_source(dict(type='DiTSource', model=models['flux'],
                          variants=[dict(controlnets=dict(canny=1.0))]))
    with pytest.raises(ValueError, match=r"\['ip_adapter'\] are not supported"):
        build_source(dict(type='DiTSource', model=models['flux'],
                          variants=[dict(ip_adapter='x')]))
    with pytest.raises(ValueError, match='used at two scales'):
        build_source(dict(type='DiTSource', model=models['sd3'], loras=dict(a='a.safetensors'),
                          variants=[dict(lora='a'), dict(lora='a', lora_scale=0.5)]))
    with pytest.raises(ValueError, match=r'\[0, 1000\)'):
        build_source(dict(type='DiTSource', model=models['sd3'], timestep=1000))


def test_dit_source_builds_the_family_of_the_folder(models, monkeypatch):
    """``DiTSource`` (the configs' type) reads the folder's pipeline and is that family's
    class, built once; ``SD3Source`` and ``FluxSource`` may be named directly."""
    from mmseg_gate.sources.dit import DiTSource, FluxSource, SD3Source
    built = []
    init = DiTSource.__init__

    def counted(self, *args, **kwargs):
        built.append(type(self))
        init(self, *args, **kwargs)
    monkeypatch.setattr(DiTSource, '__init__', counted)
    for kind, family in (('sd3', SD3Source), ('flux', FluxSource)):
        for cfg in (dict(type='DiTSource'), dict(type=family.__name__)):
            source = build_source(dict(cfg, model=models[kind], taps=('transformer_blocks.0', )))
            assert type(source) is family and isinstance(source, DiTSource)
            assert source.kind == kind and repr(source).startswith('DiTSource(')
        assert type(DiTSource(models[kind], taps=('transformer_blocks.0', ))) is family
        assert type(family(model=models[kind], taps=('transformer_blocks.0', ))) is family
    assert built == [SD3Source] * 4 + [FluxSource] * 4


@pytest.mark.parametrize('named,kind,right', [
    ('SD3Source', 'flux', 'FluxPipeline: name its source FluxSource'),
    ('FluxSource', 'sd3', 'StableDiffusion3Pipeline: name its source SD3Source')])
def test_the_wrong_family_for_a_folder_is_refused(models, named, kind, right):
    import re
    with pytest.raises(ValueError, match=re.escape(f"'{models[kind]}' holds a {right}")):
        build_source(dict(type=named, model=models[kind]))


def test_shared_dit_code_asks_no_family():
    """The families differ by the methods their classes override: no file of the package
    compares a ``kind``."""
    import ast
    import glob
    import os.path as osp
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    files = sorted(glob.glob(osp.join(root, 'mmseg_gate', 'sources', 'dit', '*.py')))
    assert {osp.basename(f) for f in files} >= {'__init__.py', 'base.py', 'sd3.py', 'flux.py'}
    found = []
    for path in files:
        for node in ast.walk(ast.parse(open(path, encoding='utf-8').read(), path)):
            if isinstance(node, ast.Compare):
                names = [getattr(side, 'id', getattr(side, 'attr', None))
                         for side in (node.left, *node.comparators)]
                if 'kind' in names:
                    found.append(f'{osp.basename(path)}:{node.lineno}')
    assert not found, f'kind compared at {found}'


def test_flux_builds_only_the_blocks_it_runs(models, tmp_path):
    """FLUX is built cut after the last tap (the file's later blocks stay unread), in the
    frozen precision asked for; a file missing a tensor of a block that runs is refused."""
    import shutil

    from safetensors.torch import load_file, save_file
    source = build_source(dict(type='DiTSource', model=models['flux'],
                               taps=('transformer_blocks.0', ), frozen_dtype='bfloat16'))
    assert len(source.transformer.transformer_blocks) == 1
    assert len(source.transformer.single_transformer_blocks) == 0
    assert source.transformer.dtype == torch.bfloat16
    assert source.unused_blocks == ['transformer_blocks.1', 'single_transformer_blocks.0',
                                    'single_transformer_blocks.1']
    single = build_source(dict(type='DiTSource', model=models['flux'],
                               taps=('single_transformer_blocks.0', )))
    assert (len(single.transformer.transformer_blocks),
            len(single.transformer.single_transformer_blocks)) == (2, 1)
    broken = tmp_path / 'flux'
    shutil.copytree(models['flux'], broken)
    weights = broken / 'transformer' / 'diffusion_pytorch_model.safetensors'
    state = load_file(weights)
    del state['transformer_blocks.0.attn.to_q.weight']
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"does not load completely.*to_q"):
        build_source(dict(type='DiTSource', model=str(broken),
                          taps=('transformer_blocks.0', )))


@pytest.mark.parametrize('config', ['gate_upernet_ade20k_sd35.py',
                                    'gate_upernet_ade20k_sd35_gate.py',
                                    'gate_upernet_ade20k_flux.py',
                                    'gate_upernet_ade20k_flux_canny.py'])
def test_shipped_dit_configs_train_with_a_stock_head(models, make_demo_cfg, tmp_path, config):
    """The shipped model (DiT source, MMSeg's MultiLevelNeck, stock UPerHead) on the tiny
    architectures and the demo data: a few training iterations."""
    import os.path as osp

    from mmengine.config import Config
    from mmseg.registry import RUNNERS
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    shipped = Config.fromfile(osp.join(root, 'configs', config))
    assert shipped.model.backbone.source.type == 'DiTSource'
    assert shipped.model.neck.type == 'MultiLevelNeck'
    assert shipped.model.neck.scales == [4, 2, 1, 0.5]
    assert shipped.model.decode_head.type == 'UPerHead'
    cfg = make_demo_cfg(tmp_path, 2)
    model = shipped.model
    model.backbone.source.model = models['sd3' if 'sd35' in config else 'flux']
    model.backbone.source.taps = ('transformer_blocks.1', )
    model.backbone.source.frozen_dtype = 'float32'
    if 'canny' in config:  # prompt-only beside prompt + ControlNet
        from mmseg_gate.testing.dit_architectures import save_random_flux_controlnet
        assert len(model.backbone.source.variants) == 2
        model.backbone.source.controlnets.canny.model = save_random_flux_controlnet(
            str(tmp_path / 'cn'), models['flux'])
    if 'sd35_gate' in config:  # GATE's three: prompt, prompt + ControlNet, prompt + LoRA
        from mmseg_gate.testing.dit_architectures import save_random_sd3_controlnet
        assert model.backbone.source.variants == [
            dict(), dict(controlnets=dict(canny=1.0)), dict(lora='a')]
        model.backbone.source.controlnets.canny.model = save_random_sd3_controlnet(
            str(tmp_path / 'cn'), models['sd3'])
        (tmp_path / 'lora').mkdir()
        model.backbone.source.loras.a = _lora_file('sd3', models['sd3'], tmp_path / 'lora')
    model.backbone.norm_cfg = dict(type='BN', requires_grad=True)
    model.neck.update(in_channels=[32], out_channels=16)
    for head in (model.decode_head, model.auxiliary_head):
        head.update(num_classes=cfg.model.decode_head.num_classes, channels=16,
                    norm_cfg=dict(type='BN', requires_grad=True))
    model.decode_head.in_channels = [16] * 4
    model.auxiliary_head.in_channels = 16
    model.data_preprocessor = cfg.model.data_preprocessor
    model.test_cfg = cfg.model.test_cfg
    cfg.model = model
    runner = RUNNERS.build(cfg)
    runner.train()
    assert runner.iter == 2
    scalars = runner.message_hub.log_scalars
    assert np.isfinite(scalars['train/loss'].current())


@pytest.mark.parametrize('kind', ['sd3', 'flux'])
def test_a_lora_variant_equals_diffusers_own_loading(models, kind, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict
    transformer_class = SD3Transformer2DModel if kind == 'sd3' else FluxTransformer2DModel
    transformer = transformer_class.from_pretrained(models[kind], subfolder='transformer')
    torch.manual_seed(3)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=['to_q', 'to_k', 'to_v', 'to_out.0']))
    pipeline = StableDiffusion3Pipeline if kind == 'sd3' else FluxPipeline
    pipeline.save_lora_weights(str(tmp_path), get_peft_model_state_dict(transformer))
    lora = str(tmp_path / 'pytorch_lora_weights.safetensors')
    taps = ('transformer_blocks.1', )
    source = build_source(dict(type='DiTSource', model=models[kind], prompt='a photo',
                               loras=dict(a=lora), taps=taps, timestep=300,
                               variants=[dict(), dict(lora='a')], **RAW))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    plain, adapted = source(images, generator=torch.Generator().manual_seed(0))
    expected = _reference(kind, models[kind], images, taps, 300, 'a photo', lora=str(tmp_path))
    torch.testing.assert_close(adapted[taps[0]], expected[taps[0]], rtol=1e-4, atol=1e-4)
    without = _reference(kind, models[kind], images, taps, 300, 'a photo')
    torch.testing.assert_close(plain[taps[0]], without[taps[0]], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain[taps[0]], adapted[taps[0]], atol=1e-3)
    assert source.variant_names == ['prompt', 'prompt + lora a']


def test_content_shift_tool_on_a_dit(models, tmp_path, run_tool_here):
    """The guideline on SD3: prompt-only against a LoRA and a ControlNet variant, scores,
    feature pictures and img2img reconstructions."""
    import json
    import os.path as osp

    from PIL import Image
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    transformer = SD3Transformer2DModel.from_pretrained(models['sd3'], subfolder='transformer')
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=['to_q', 'to_k', 'to_v', 'to_out.0']))
    StableDiffusion3Pipeline.save_lora_weights(str(tmp_path), get_peft_model_state_dict(
        transformer))
    from mmseg_gate.testing.dit_architectures import save_random_sd3_controlnet
    controlnet = save_random_sd3_controlnet(str(tmp_path / 'cn'), models['sd3'])
    config = tmp_path / 'dit.py'
    config.write_text(
        f"_base_ = [{osp.join(root, 'configs', 'gate_upernet_ade20k_sd35.py')!r}]\n"
        f"model = dict(backbone=dict(source=dict(model={models['sd3']!r}, "
        f"loras=dict(a={str(tmp_path / 'pytorch_lora_weights.safetensors')!r}), "
        f"controlnets=dict(canny=dict(model={controlnet!r})), "
        "variants=[dict(), dict(lora='a'), dict(controlnets=dict(canny=1.0))], "
        "taps=('transformer_blocks.0', 'transformer_blocks.1'), frozen_dtype='float32')))\n")
    images = []
    for i in range(2):
        path = tmp_path / f'{i}.png'
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
                        ).save(path)
        images.append(str(path))
    out = tmp_path / 'out'
    result = run_tool_here('content_shift', config, *images, '--size', '64', '--timesteps',
                           '50', '200', '--out', out, '--no-progress', '--steps', '2',
                           '--device', 'cpu')
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / 'content_shift.json').read_text())
    assert len(report['variants']) == 3 and report['variants'][1].endswith('+ lora a')
    assert report['variants'][2].endswith('+ canny')
    # The DiT's treatment of massive activations is part of what was measured.
    assert report['source']['tap_transform'] == 'adaln'
    assert set(report['discarded_channels']) == {'transformer_blocks.0', 'transformer_blocks.1'}
    assert '`transformer_blocks.1` | 200 |' in (out / 'content_shift.md').read_text()
    assert (out / 'features_0.png').is_file() and (out / 'content_shift.md').is_file()
    grid = Image.open(out / 'reconstruction_1.png')  # the input and one per variant
    assert grid.width == 4 * 128


@pytest.mark.parametrize('kind', ['sd3', 'flux'])
def test_a_controlnet_variant_equals_diffusers(models, tmp_path, kind):
    from mmseg_gate.testing.dit_architectures import (save_random_flux_controlnet,
                                                      save_random_sd3_controlnet)
    save = save_random_sd3_controlnet if kind == 'sd3' else save_random_flux_controlnet
    controlnet = save(str(tmp_path / 'cn'), models[kind])
    taps = ('transformer_blocks.1', ) if kind == 'flux' else ('transformer_blocks.2', )
    source = build_source(dict(
        type='DiTSource', model=models[kind], prompt='a photo', taps=taps, timestep=300,
        controlnets=dict(canny=dict(model=controlnet, condition=dict(type='canny'))),
        variants=[dict(), dict(controlnets=dict(canny=1.0)), dict(controlnets=dict(canny=0.5))],
        **RAW))
    # A structured image, so that Canny finds edges.
    ramp = torch.linspace(-1, 1, 64)
    images = torch.stack([ramp[None, :].expand(64, 64), ramp[:, None].expand(64, 64),
                          (ramp[None, :] * ramp[:, None] > 0).float() * 2 - 1])[None]
    plain, guided, half = source(images, generator=torch.Generator().manual_seed(0))
    assert source.counts['controlnet_passes'] == 1  # shared by both scales
    for result, scale in ((guided, 1.0), (half, 0.5)):
        expected = _reference(kind, models[kind], images, taps, 300, 'a photo',
                              controlnet=controlnet, controlnet_scale=scale)
        torch.testing.assert_close(result[taps[0]], expected[taps[0]], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain[taps[0]], guided[taps[0]], atol=1e-3)


def _lora_file(kind, folder, out):
    """A random DiT LoRA (non-zero, scaled up so that it visibly steers the tiny models)
    saved by the pipeline's own ``save_lora_weights``."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict
    cls = SD3Transformer2DModel if kind == 'sd3' else FluxTransformer2DModel
    transformer = cls.from_pretrained(folder, subfolder='transformer')
    torch.manual_seed(3)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=['to_q', 'to_k', 'to_v']))
    with torch.no_grad():  # diffusers' LoRA files keep no alpha: scale the weights instead
        for name, param in transformer.named_parameters():
            if 'lora_B' in name:
                param.mul_(8)
    pipeline = StableDiffusion3Pipeline if kind == 'sd3' else FluxPipeline
    pipeline.save_lora_weights(str(out), get_peft_model_state_dict(transformer))
    return str(out / 'pytorch_lora_weights.safetensors')


@pytest.mark.parametrize('kind', ['sd3', 'flux'])
def test_dit_reconstructions_are_diffusers_img2img(models, tmp_path, kind):
    """Prompt-only, LoRA and ControlNet reconstructions: the prompt-only one is what
    diffusers' img2img pipeline, loaded by itself, returns; the LoRA and the ControlNet steer
    it; on SD3 (no ControlNet img2img pipeline in diffusers) the ControlNet variant at scale 0
    is the img2img reconstruction, which checks its img2img start and schedule."""
    from mmseg_gate.analysis.dit_reconstruction import DiTReconstructor
    from mmseg_gate.testing.dit_architectures import (save_random_flux_controlnet,
                                                      save_random_sd3_controlnet)
    save = save_random_sd3_controlnet if kind == 'sd3' else save_random_flux_controlnet
    nets = dict(canny=dict(model=save(str(tmp_path / 'cn'), models[kind])))
    loras = dict(a=_lora_file(kind, models[kind], tmp_path))
    source = build_source(dict(
        type='DiTSource', model=models[kind], prompt='a photo', loras=loras, controlnets=nets,
        taps=('transformer_blocks.0', ), frozen_dtype='float32',
        variants=[dict(), dict(lora='a'), dict(controlnets=dict(canny=1.0)),
                  dict(controlnets=dict(canny=0.0))]))
    reconstructor = DiTReconstructor(source, loras, nets, None, torch.device('cpu'),
                                     torch.float32)
    ramp = torch.linspace(-1, 1, 64)
    image = torch.stack([ramp[None, :].expand(64, 64), ramp[:, None].expand(64, 64),
                         (ramp[None, :] * ramp[:, None] > 0).float() * 2 - 1])
    plain, lora, guided, unguided = [np.asarray(r, dtype=np.int16) for r in reconstructor(
        image, strength=0.6, steps=5, guidance_scale=5.0, seed=0)]
    pipe_class = StableDiffusion3Img2ImgPipeline if kind == 'sd3' else FluxImg2ImgPipeline
    pipe = pipe_class.from_pretrained(models[kind])
    from mmseg_gate.analysis.pictures import to_pil
    expected = pipe(prompt='a photo', image=to_pil(image), strength=0.6, num_inference_steps=5,
                    guidance_scale=5.0 if kind == 'sd3' else source.guidance_scale,
                    height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert plain.shape == (64, 64, 3)  # within 2/255: rounding to uint8 on any CPU
    assert np.abs(plain - np.asarray(expected, dtype=np.int16)).max() <= 2
    assert np.abs(plain - lora).max() > 8 and np.abs(plain - guided).max() > 8
    if kind == 'sd3':
        assert np.abs(plain - unguided).max() <= 2
    again = reconstructor(image, strength=0.6, steps=5, guidance_scale=5.0, seed=0)
    assert np.array_equal(np.asarray(again[2], dtype=np.int16), guided)


@pytest.mark.parametrize('kind', ['sd3', 'flux'])
def test_batched_variants_equal_one_after_another(models, tmp_path, kind):
    """One transformer batch for all variants (two prompts, LoRAs chosen per sample, a
    ControlNet pass shared by the variants of one prompt and scaled per variant) gives each
    variant's own features."""
    from mmseg_gate.testing.dit_architectures import (save_random_flux_controlnet,
                                                      save_random_sd3_controlnet)
    save = save_random_sd3_controlnet if kind == 'sd3' else save_random_flux_controlnet
    cfg = dict(type='DiTSource', model=models[kind], prompt='a photo', timestep=300,
               taps=('transformer_blocks.0', 'transformer_blocks.1'),
               loras=dict(a=_lora_file(kind, models[kind], tmp_path)),
               controlnets=dict(canny=dict(model=save(str(tmp_path / 'cn'), models[kind]))),
               variants=[dict(), dict(prompt='a dog', lora='a'),
                         dict(lora='a', controlnets=dict(canny=0.5)),
                         dict(controlnets=dict(canny=1.0))])
    ramp = torch.linspace(-1, 1, 64)
    images = torch.stack([ramp[None, :].expand(64, 64), ramp[:, None].expand(64, 64),
                          (ramp[None, :] * ramp[:, None] > 0).float() * 2 - 1])[None]
    batched = build_source(cfg)
    single = build_source(dict(cfg, batch_variants=False))
    ours = batched(images, generator=torch.Generator().manual_seed(0))
    theirs = single(images, generator=torch.Generator().manual_seed(0))
    for mine, reference in zip(ours, theirs):
        for tap in cfg['taps']:
            torch.testing.assert_close(mine[tap], reference[tap], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours[2]['transformer_blocks.1'], ours[3]['transformer_blocks.1'],
                              atol=1e-3)
    assert batched.counts['transformer_passes'] == 4
    assert batched.counts['controlnet_passes'] == 1  # canny with 'a photo', both scales
    assert single.counts['controlnet_passes'] == 1


@pytest.mark.parametrize('kind', ['sd3', 'flux'])
def test_dit_features_extract_once_into_the_store(models, tmp_path, kind):
    """The plain extraction API on a DiT source: the stored maps are the source's, and the
    backbone on the store gives what it gives on the live source."""
    from PIL import Image

    from mmseg_gate import GATEBackbone
    from mmseg_gate.datasets.image_lists import folder_images
    from mmseg_gate.store import extract_features
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
                        ).save(folder / f'{i}.png')
    cfg = dict(type='DiTSource', model=models[kind], prompt='a photo', timestep=100,
               taps=('transformer_blocks.1', ), frozen_dtype='float32',
               variants=[dict(), dict(prompt='a dog')])
    images = folder_images(str(folder))
    store = extract_features(cfg, images, str(tmp_path / 'store'), noise_seed=3,
                             dtype='float32', progress=False)
    live = GATEBackbone(source=cfg, noise_seed=3).eval()
    stored = GATEBackbone(source=dict(type='StoredSource', store=store.folder, source=cfg,
                                      noise_seed=3, dtype='float32'), noise_seed=3).eval()
    stored.load_state_dict(live.state_dict())
    with torch.no_grad():
        for a, b in zip(live(images.load(1)[None]), stored(images.load(1)[None])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind, part, files', [
    ('sd3', 'tokenizer_3', None), ('sd3', 'tokenizer_3', ('spiece.model', 'tokenizer.json')),
    ('flux', 'tokenizer_2', None), ('sd3', 'scheduler', None), ('flux', 'text_encoder', None)])
def test_a_pipeline_folder_missing_a_part_is_named(models, tmp_path, kind, part, files):
    """transformers 5 builds a default T5 tokenizer from a folder without one (every prompt
    unknown tokens): a missing part, or a part without the files its loader reads, is an
    error naming the folder and the part, before anything loads."""
    import shutil
    folder = tmp_path / kind
    shutil.copytree(models[kind], folder)
    if files is None:
        shutil.rmtree(folder / part)
        expected = rf"'{folder}' has no '{part}/' folder"
    else:
        for name in files:
            (folder / part / name).unlink(missing_ok=True)
        expected = rf"'{folder / part}' lacks spiece.model or tokenizer.json"
    with pytest.raises(FileNotFoundError, match=expected):
        build_source(dict(type='DiTSource', model=str(folder)))


def test_extract_features_names_a_missing_scheduler(models, tmp_path, run_tool_here):
    import os.path as osp
    import shutil
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    folder = tmp_path / 'sd3'
    shutil.copytree(models['sd3'], folder)
    shutil.rmtree(folder / 'scheduler')
    images = tmp_path / 'images'
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / 'a.png')
    result = run_tool_here('extract_features',
                           osp.join(root, 'configs', 'gate_upernet_ade20k_sd35.py'), '--out',
                           tmp_path / 'store', '--images', images, '--device', 'cpu',
                           '--cfg-options', f'model.backbone.source.model={folder}')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert f"[extract_features] error: '{folder}' has no 'scheduler/' folder" in result.stderr


@pytest.mark.parametrize('damage', ['truncated', 'pickle', 'nan'])
def test_a_damaged_dit_lora_is_named(models, tmp_path, damage):
    from peft import LoraConfig, get_peft_model_state_dict
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file, save_file
    transformer = SD3Transformer2DModel.from_pretrained(models['sd3'], subfolder='transformer')
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=['to_q']))
    StableDiffusion3Pipeline.save_lora_weights(str(tmp_path),
                                               get_peft_model_state_dict(transformer))
    path = tmp_path / 'pytorch_lora_weights.safetensors'
    weights = {k: v.clone() for k, v in load_file(path).items()}  # unmapped: rewritten below
    if damage == 'truncated':
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif damage == 'pickle':
        torch.save(weights, path)
    else:
        next(iter(weights.values()))[0, 0] = float('nan')
        save_file(weights, path)
    problem = 'non-finite' if damage == 'nan' else 'not a readable safetensors'
    with pytest.raises(ValueError, match=rf"(?s)LoRA file '{path}'.*{problem}"):
        build_source(dict(type='DiTSource', model=models['sd3'], loras=dict(a=str(path)),
                          variants=[dict(lora='a')]))
