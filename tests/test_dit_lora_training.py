"""GATE's LoRA technique on diffusion transformers (issue 29): the flow-matching LoRA recipe
on tiny random SD3 and FLUX pipelines -- it learns, its file is diffusers' own format, a
resumed run ends where an uninterrupted one does, bad settings are named -- and random DiT
LoRAs and ControlNets for the benchmark."""
import json
import os.path as osp

import numpy as np
import pytest
import torch
from diffusers import (FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from mmengine.config import Config
from safetensors import safe_open
from safetensors.torch import load_file

from mmseg_gate.protocols.dit_lora_training import (DIT_TARGETS, DiTLoRATrainer,
                                                    FluxLoRATrainer, SD3LoRATrainer,
                                                    make_lora_trainer)
from mmseg_gate.protocols.lora_training import LoRATrainer
from mmseg_gate.sources.dit import image_ids, load_dit_lora, pack_latents
from mmseg_gate.testing.demo_data import write_ade_layout_dataset
from mmseg_gate.testing.dit_architectures import save_random_flux, save_random_sd3

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = dict(sd3='ade20k_sd35.py', flux='ade20k_flux.py')
PIPELINES = dict(sd3=StableDiffusion3Pipeline, flux=FluxPipeline)
TRANSFORMERS = dict(sd3=SD3Transformer2DModel, flux=FluxTransformer2DModel)


@pytest.fixture(scope='module')
def dits(tmp_path_factory):
    root = tmp_path_factory.mktemp('dit')
    return dict(sd3=save_random_sd3(str(root / 'sd3')), flux=save_random_flux(str(root / 'flux')))


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp('ade')
    write_ade_layout_dataset(str(root), num_train=4, num_val=0)
    return str(root / 'images' / 'training')


def recipe(dits, kind, images, work_dir, **options) -> Config:
    """The shipped recipe of the family on its tiny model: 32x32 images, 8 T5 tokens, a
    learning rate that shows learning within 20 steps."""
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'lora', CONFIGS[kind]))
    cfg.merge_from_dict(dict(dict(model=dits[kind], image_dir=images, work_dir=str(work_dir),
                                  num_images=4, resolution=32, rank=8, alpha=4,
                                  transformer_lr=1e-2, steps=20, save_every=10, log_every=5,
                                  batch_size=2, max_sequence_length=8), **options))
    return cfg


@pytest.mark.parametrize('kind', ['sd3', 'flux'])
def test_training_lowers_the_flow_matching_loss(dits, images, tmp_path, kind):
    trainer = DiTLoRATrainer(recipe(dits, kind, images, tmp_path), torch.device('cpu'))
    assert type(trainer) is dict(sd3=SD3LoRATrainer, flux=FluxLoRATrainer)[kind]
    log = trainer.train(progress=False)
    losses = [e['loss'] for e in log]
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses
    assert trainer.weighting_scheme == dict(sd3='logit_normal', flux='none')[kind]
    # The targets of diffusers' scripts, every layer of them adapted.
    adapted = {n.rsplit('.lora_A', 1)[0] for n, _ in trainer.transformer.named_parameters()
               if '.lora_A.' in n}
    assert {n.split('.', 2)[-1] for n in adapted if n.startswith('transformer_blocks.0.')} \
        == set(DIT_TARGETS[kind])
    path = tmp_path / 'lora_step20.safetensors'
    assert path.exists() and (tmp_path / 'lora_step10.safetensors').exists()
    assert all(k.startswith('transformer.') for k in load_file(str(path)))
    with safe_open(str(path), 'pt') as f:
        meta = json.loads(f.metadata()['lora_adapter_metadata'])
    assert (meta['transformer.r'], meta['transformer.lora_alpha']) == (8, 4)


def _inputs(kind):
    """One input of the tiny transformers (8x8 latents, 10 text tokens)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 10, 64, generator=g)
    if kind == 'sd3':
        return dict(hidden_states=latents, timestep=torch.tensor([500.0]),
                    encoder_hidden_states=text,
                    pooled_projections=torch.randn(1, 64, generator=g))
    return dict(hidden_states=pack_latents(latents), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]), encoder_hidden_states=text,
                pooled_projections=torch.randn(1, 32, generator=g),
                txt_ids=torch.zeros(10, 3), img_ids=image_ids(4, 4))


@pytest.mark.parametrize('alpha', [8, 4])  # rank 8: scale 1, and alpha / rank from the file
@pytest.mark.parametrize('kind', ['sd3', 'flux'])
def test_saved_file_is_what_diffusers_loads(dits, images, tmp_path, kind, alpha):
    """The trained file through diffusers' own ``load_lora_weights`` (into the pipeline) and
    through the DiT source's counted loader: the same transformer output, not the base's."""
    cfg = recipe(dits, kind, images, tmp_path, steps=3, save_every=3, alpha=alpha)
    DiTLoRATrainer(cfg, torch.device('cpu')).train(progress=False)
    path = str(tmp_path / 'lora_step3.safetensors')
    pipe = PIPELINES[kind].from_pretrained(dits[kind])
    pipe.load_lora_weights(path)
    ours = TRANSFORMERS[kind].from_pretrained(dits[kind], subfolder='transformer')
    load_dit_lora(ours, 'a', path)
    base = TRANSFORMERS[kind].from_pretrained(dits[kind], subfolder='transformer')
    with torch.no_grad():
        theirs, mine, plain = (model(**_inputs(kind), return_dict=False)[0]
                               for model in (pipe.transformer, ours, base))
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mine, plain, atol=1e-3)


@pytest.mark.parametrize('kind', ['sd3', 'flux'])
def test_resume_continues_exactly(dits, images, tmp_path, kind):
    steps = dict(steps=8, save_every=4, log_every=2)
    DiTLoRATrainer(recipe(dits, kind, images, tmp_path / 'full', **steps),
                   torch.device('cpu')).train(progress=False)
    DiTLoRATrainer(recipe(dits, kind, images, tmp_path / 'part', **dict(steps, steps=4)),
                   torch.device('cpu')).train(progress=False)
    log = DiTLoRATrainer(recipe(dits, kind, images, tmp_path / 'part', **steps),
                         torch.device('cpu')).train(resume=True, progress=False)
    assert [e['step'] for e in log] == list(range(1, 9))
    a = load_file(str(tmp_path / 'full' / 'lora_step8.safetensors'))
    b = load_file(str(tmp_path / 'part' / 'lora_step8.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A resume with other settings is refused by name, before any step.
    changed = recipe(dits, kind, images, tmp_path / 'part', steps=12, weighting_scheme='mode')
    with pytest.raises(ValueError, match=r'other settings \(weighting_scheme: '):
        DiTLoRATrainer(changed, torch.device('cpu')).train(resume=True, progress=False)
    assert not (tmp_path / 'part' / 'lora_step12.safetensors').exists()


@pytest.mark.parametrize('kind', ['sd3', 'flux'])
def test_half_precision_and_checkpointing(dits, images, tmp_path, kind):
    """bfloat16 frozen weights with float32 LoRA weights and gradient checkpointing, on the
    CPU; the SD3 script's preconditioned outputs and a reweighting scheme on the way."""
    cfg = recipe(dits, kind, images, tmp_path, steps=3, save_every=3,
                 precondition_outputs=True, weighting_scheme='cosmap')
    trainer = DiTLoRATrainer(cfg, torch.device('cpu'), 'bf16', gradient_checkpointing=True)
    log = trainer.train(progress=False)
    assert all(np.isfinite(e['loss']) for e in log)
    lora = [p for n, p in trainer.transformer.named_parameters() if 'lora' in n]
    frozen = [p for n, p in trainer.transformer.named_parameters() if 'lora' not in n]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    assert trainer.transformer.is_gradient_checkpointing
    assert any(p.abs().sum() > 0 for n, p in trainer.transformer.named_parameters()
               if 'lora_B' in n)  # B starts at zero: the LoRA learned through the blocks


@pytest.mark.parametrize('options, message', [
    (dict(resolution=40), r'resolution must be a multiple of 16'),
    (dict(rank=0), r'rank must be a positive integer'),
    (dict(alpha='big'), r'alpha must be a positive number'),
    (dict(transformer_lr=0), r'transformer_lr must be a positive number'),
    (dict(weighting_scheme='uniform'), r"weighting_scheme must be None .* got 'uniform'"),
    (dict(target_modules='attn.to_q'), r'target_modules must be None .* or a non-empty list'),
    (dict(max_sequence_length=0), r'max_sequence_length must be None'),
    (dict(max_grad_norm=-1), r'max_grad_norm must be a non-negative number'),
    (dict(text_encoder_lr=5e-5), r"\['text_encoder_lr'\] are settings of UNet LoRA recipes"),
    (dict(sd_model='x'), r'calls the weights `model`'),
])
def test_bad_recipe_values_are_named(dits, images, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        DiTLoRATrainer(recipe(dits, 'flux', images, tmp_path, **options), torch.device('cpu'))


def test_wrong_models_and_targets_are_named(dits, images, tmp_path, tiny_sd):
    with pytest.raises(ValueError, match=r"target_modules \['attn.nowhere'\] name no layer"):
        DiTLoRATrainer(recipe(dits, 'sd3', images, tmp_path, target_modules=['attn.nowhere']),
                       torch.device('cpu')).train(progress=False)
    with pytest.raises(ValueError, match='holds a StableDiffusionPipeline'):
        DiTLoRATrainer(recipe(dits, 'sd3', images, tmp_path, model=tiny_sd), torch.device('cpu'))
    with pytest.raises(ValueError, match=r'holds a flux pipeline: train it with FluxLoRATrainer'):
        SD3LoRATrainer(recipe(dits, 'flux', images, tmp_path), torch.device('cpu'))
    unet = Config.fromfile(osp.join(ROOT, 'configs', 'lora', 'demo.py'))
    unet.merge_from_dict(dict(model=dits['sd3'], image_dir=images, work_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r'is a diffusion transformer .*DiTLoRATrainer'):
        LoRATrainer(unet, torch.device('cpu')).train(progress=False)
    # The tool's choice: by the model's pipeline.
    dit = recipe(dits, 'sd3', images, tmp_path)
    assert type(make_lora_trainer(dit, torch.device('cpu'))) is SD3LoRATrainer
    unet.model = tiny_sd
    assert type(make_lora_trainer(unet, torch.device('cpu'))) is LoRATrainer
    # A DiT recipe whose model is not there: the DiT loader's error, with how to get one.
    with pytest.raises(FileNotFoundError,
                       match=r'(?s)not a diffusers pipeline folder.*hf download'):
        make_lora_trainer(recipe(dits, 'sd3', images, tmp_path, model=str(tmp_path / 'none')),
                          torch.device('cpu'))


def test_a_float32_lora_loads_into_a_bfloat16_source(dits, images, tmp_path):
    """The trainer keeps LoRA weights in float32; FLUX's shipped config runs the source in
    bfloat16 (configs/gate_upernet_ade20k_flux.py)."""
    from mmseg_gate.sources import build_source
    DiTLoRATrainer(recipe(dits, 'flux', images, tmp_path, steps=1, save_every=1),
                   torch.device('cpu')).train(progress=False)
    source = build_source(dict(type='DiTSource', model=dits['flux'], frozen_dtype='bfloat16',
                               loras=dict(a=str(tmp_path / 'lora_step1.safetensors')),
                               variants=[dict(), dict(lora='a')]))
    assert 'a' in source.transformer.peft_config


def test_tool_trains_and_resumes_a_flux_lora(dits, images, tmp_path, run_tool_here):
    options = [f'model={dits["flux"]}', f'image_dir={images}', f'work_dir={tmp_path}',
               'num_images=4', 'resolution=32', 'max_sequence_length=8', 'save_every=2',
               'batch_size=2']
    command = [osp.join(ROOT, 'configs', 'lora', 'ade20k_flux.py'), '--device', 'cpu',
               '--no-progress', '--cfg-options', *options]
    first = run_tool_here('train_lora', *command, 'steps=2')
    assert first.returncode == 0, first.stderr[-3000:]
    assert 'flux transformer' in first.stdout and (tmp_path / 'lora_step2.safetensors').exists()
    again = run_tool_here('train_lora', *command[:4], '--resume', *command[4:], 'steps=4')
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'resumed from' in again.stdout and (tmp_path / 'lora_step4.safetensors').exists()


@pytest.mark.parametrize('config, arch, variants', [
    ('gate_upernet_ade20k_sd35.py', 'tiny-sd35', 'lora+controlnet'),
    ('gate_upernet_ade20k_flux_canny.py', 'tiny-flux', 'lora'),
])
def test_benchmark_writes_random_dit_loras_and_controlnets(tmp_path, config, arch, variants):
    """``--random-init`` of a DiT config with LoRA and ControlNet variants: random files of
    the architecture's layout (the LoRA through the trainer's writer) that the source loads
    and runs."""
    from mmseg_gate.benchmark import benchmark, with_backbone
    from mmseg_gate.testing.random_models import write_random_models
    cfg = with_backbone(Config.fromfile(osp.join(ROOT, 'configs', config)))
    source = cfg.model.backbone.source
    source.loras = dict(a='missing.safetensors')
    if 'controlnet' in variants:
        source.controlnets = dict(canny=dict(model='missing', condition=dict(type='canny')))
        source.variants = [dict(), dict(lora='a'), dict(controlnets=dict(canny=1.0), lora='a')]
    else:
        source.variants = [dict(), dict(controlnets=dict(canny=1.0), lora='a')]
    source.frozen_dtype = 'float32'  # bfloat16 runs slowly on the CPU
    write_random_models(source, str(tmp_path), arch, 4)
    assert load_file(source.loras.a) and source.controlnets.canny.model.startswith(str(tmp_path))
    report = benchmark(cfg, (64, 64), torch.device('cpu'), iters=1, batch=1)
    assert report['transformer_passes'] == len(source.variants)
    assert report['controlnet_passes'] == 1 and 0 < report['frozen_flops'] < report['flops']
