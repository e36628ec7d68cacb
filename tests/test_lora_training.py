"""The LoRA recipe: text-encoder LoRA end to end, captions, resume, accelerator settings."""
import json
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from safetensors.torch import load_file

from mmseg_gate import StableDiffusionSource
from mmseg_gate.protocols.lora_training import LoRATrainer
from mmseg_gate.testing.demo_data import write_ade_layout_dataset

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def lora_images(tmp_path_factory):
    root = tmp_path_factory.mktemp('ade')
    write_ade_layout_dataset(str(root), num_train=4, num_val=0)
    return str(root / 'images' / 'training')


def recipe(tiny_sd, image_dir, work_dir, **options):
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'lora', 'demo.py'))
    cfg.merge_from_dict(dict(dict(model=tiny_sd, image_dir=image_dir,
                                  work_dir=str(work_dir), num_images=4, steps=20,
                                  save_every=10, log_every=5, batch_size=4, unet_lr=3e-3,
                                  text_encoder_lr=3e-3), **options))
    return cfg


def test_text_encoder_lora_end_to_end(tiny_sd, lora_images, tmp_path):
    """Trained with captions, saved in one file, and the variant's prompt is encoded with
    it (the plain variant's is not)."""
    captions = tmp_path / 'captions.json'
    captions.write_text(json.dumps({'ADE_train_00000000.jpg': 'a photo of a wall'}))
    cfg = recipe(tiny_sd, lora_images, tmp_path / 'lora', captions=str(captions))
    log = LoRATrainer(cfg, torch.device('cpu')).train(progress=False)
    assert sum(e['loss'] for e in log[-5:]) < sum(e['loss'] for e in log[:5])
    path = str(tmp_path / 'lora' / 'lora_step20.safetensors')
    keys = list(load_file(path))
    assert any(k.startswith('text_encoder.') and 'q_proj.lora_A' in k for k in keys)
    assert any(k.startswith('unet.') for k in keys)
    extractor = StableDiffusionSource(model=tiny_sd, prompt='a photo', loras=dict(a=path),
                                     variants=[dict(), dict(lora='a')])
    assert extractor.text_adapters == {extractor.variants[1].adapter: 1.0}
    plain, adapted = extractor.embedding(0).hidden, extractor.embedding(1).hidden
    assert not torch.allclose(plain, adapted)
    base = StableDiffusionSource(model=tiny_sd, prompt='a photo').embedding(0).hidden
    assert torch.equal(plain, base)


def test_text_encoder_lora_needs_no_transformers_peft_integration(tiny_sd, lora_images,
                                                                 tmp_path, monkeypatch):
    """Training, saving, loading and activating text-encoder LoRAs use peft's own functions:
    transformers' integration (which refuses peft 0.21 from transformers 5.24 on) is off."""
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' PEFT integration was used")

    for method in ('add_adapter', 'load_adapter', 'set_adapter', 'enable_adapters',
                   'disable_adapters', 'delete_adapter', 'active_adapters'):
        monkeypatch.setattr(PreTrainedModel, method, refuse)
    cfg = recipe(tiny_sd, lora_images, tmp_path / 'lora', steps=4, save_every=4)
    LoRATrainer(cfg, torch.device('cpu')).train(progress=False)
    path = str(tmp_path / 'lora' / 'lora_step4.safetensors')
    extractor = StableDiffusionSource(model=tiny_sd, prompt='a photo', loras=dict(a=path),
                                     variants=[dict(), dict(lora='a')])
    assert extractor.text_adapters == {extractor.variants[1].adapter: 1.0}
    assert not torch.allclose(extractor.embedding(0).hidden, extractor.embedding(1).hidden)


def test_unet_only_files_keep_working(tiny_sd, tiny_loras):
    extractor = StableDiffusionSource(model=tiny_sd, prompt='a photo', loras=tiny_loras,
                                     variants=[dict(), dict(lora='a')])
    assert extractor.text_adapters == {}
    assert torch.equal(extractor.embedding(0).hidden, extractor.embedding(1).hidden)


def test_resume_continues_exactly(tiny_sd, lora_images, tmp_path):
    full = recipe(tiny_sd, lora_images, tmp_path / 'full')
    LoRATrainer(full, torch.device('cpu')).train(progress=False)
    part = recipe(tiny_sd, lora_images, tmp_path / 'part', steps=10)
    LoRATrainer(part, torch.device('cpu')).train(progress=False)
    rest = recipe(tiny_sd, lora_images, tmp_path / 'part')
    log = LoRATrainer(rest, torch.device('cpu')).train(resume=True, progress=False)
    assert [e['step'] for e in log] == list(range(1, 21))
    a = load_file(str(tmp_path / 'full' / 'lora_step20.safetensors'))
    b = load_file(str(tmp_path / 'part' / 'lora_step20.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_half_precision_and_checkpointing(tiny_sd, lora_images, tmp_path):
    """bfloat16 frozen weights (float16's CPU stand-in) with float32 LoRA weights, and
    gradient checkpointing: the accelerator settings, exercised on the CPU."""
    cfg = recipe(tiny_sd, lora_images, tmp_path, steps=4, save_every=4)
    trainer = LoRATrainer(cfg, torch.device('cpu'), 'bf16', gradient_checkpointing=True)
    log = trainer.train(progress=False)
    assert all(torch.isfinite(torch.tensor(e['loss'])) for e in log)
    lora = [p for n, p in trainer.unet.named_parameters() if 'lora' in n]
    frozen = [p for n, p in trainer.unet.named_parameters() if 'lora' not in n]
    assert all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert trainer.unet.is_gradient_checkpointing
    # The text encoder's LoRA learns through its checkpointed layers (B starts at zero).
    text_b = [p for n, p in trainer.text_encoders[0].named_parameters() if 'lora_B' in n]
    assert text_b and any(p.abs().sum() > 0 for p in text_b)


def test_tool_with_resume_and_bad_settings(tiny_sd, lora_images, tmp_path, run_tool_here):
    options = [f'model={tiny_sd}', f'image_dir={lora_images}', f'work_dir={tmp_path}',
               'num_images=4', 'steps=4', 'save_every=2', 'log_every=2', 'batch_size=2']
    command = [osp.join(ROOT, 'configs', 'lora', 'demo.py'), '--device', 'cpu',
               '--no-progress', '--cfg-options', *options]
    first = run_tool_here('train_lora', *command)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_tool_here('train_lora', *command[:-len(options) - 1], '--resume',
                          '--cfg-options', *options[:-4], 'steps=6', *options[-3:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'resumed from' in again.stdout and (tmp_path / 'lora_step6.safetensors').exists()


def test_resume_with_other_settings_is_refused(tiny_sd, lora_images, tmp_path):
    """The saved state holds the recipe's settings; a resume that changes one that alters the
    training (here the rank and the UNet's learning rate) is refused by name, before any
    step."""
    work = tmp_path / 'lora'
    LoRATrainer(recipe(tiny_sd, lora_images, work, steps=2, save_every=2),
                torch.device('cpu')).train(progress=False)
    changed = recipe(tiny_sd, lora_images, work, steps=4, save_every=2, rank=2, unet_lr=1e-3)
    with pytest.raises(ValueError, match=r'other settings \(rank: 8 there, 2 now; unet_lr: '
                       r'0.003 there, 0.001 now\)'):
        LoRATrainer(changed, torch.device('cpu')).train(resume=True, progress=False)
    assert not (work / 'lora_step4.safetensors').exists()


def test_old_weights_key_is_refused_naming_model(tiny_sd, lora_images, tmp_path):
    cfg = recipe(tiny_sd, lora_images, tmp_path)
    cfg.sd_model = tiny_sd
    with pytest.raises(ValueError, match=r'calls the weights `model`.*not\s+`sd_model`'):
        LoRATrainer(cfg, torch.device('cpu'))
