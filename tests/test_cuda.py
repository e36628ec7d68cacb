"""The accelerator path. These run only where CUDA is available and visible
(``GATE_TEST_CUDA=1 bash tools/run_tests.sh``); elsewhere they are skipped, and the same code
paths run on the CPU in the other tests (bfloat16 frozen parts, device arguments)."""
import os.path as osp
import subprocess
import sys

import pytest
import torch

from mmseg.registry import MODELS, RUNNERS
from mmseg_gate import StableDiffusionSource
from mmseg_gate.testing.demo_data import (write_ade_layout_dataset,
                                          write_ddpm_seg_layout_dataset,
                                          write_spair_layout_dataset)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_half_frozen_parts_match_float32(gate_kwargs, dtype):
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    reference = StableDiffusionSource(**gate_kwargs)(images)
    low = StableDiffusionSource(**dict(gate_kwargs, frozen_dtype=dtype)).to('cuda')
    assert low.unet.dtype == getattr(torch, dtype)
    for ours, ref in zip(low(images.cuda()), reference):  # mixed-adapter batch on CUDA
        for tap in ref:
            error = (ours[tap].float().cpu() - ref[tap]).abs().mean()
            assert error < 0.05 * ref[tap].abs().mean(), tap


def test_model_cuda_places_everything(make_demo_cfg, tmp_path):
    model = MODELS.build(make_demo_cfg(tmp_path, 1).model).cuda().eval()
    extractor = model.backbone.source
    assert extractor.unet.device.type == 'cuda' and extractor.unet.dtype == torch.float16
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 64, 96, device="cuda") * 2 - 1, mode="tensor")
    assert logits.is_cuda and torch.isfinite(logits).all()


def test_training_iterations_on_cuda(make_demo_cfg, tmp_path):
    cfg = make_demo_cfg(tmp_path, 3)
    runner = RUNNERS.build(cfg)
    runner.train()
    assert runner.iter == 3
    assert next(runner.model.parameters()).is_cuda


def test_lora_training_on_cuda(tiny_sd, tmp_path):
    from mmengine.config import Config

    from mmseg_gate.protocols.lora_training import LoRATrainer
    write_ade_layout_dataset(str(tmp_path / 'ade'), num_train=4, num_val=0)
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'lora', 'demo.py'))
    cfg.merge_from_dict(dict(model=tiny_sd, image_dir=str(tmp_path / 'ade/images/training'),
                             work_dir=str(tmp_path / 'lora'), num_images=4, steps=4,
                             save_every=4, batch_size=2))
    trainer = LoRATrainer(cfg, torch.device('cuda'), 'fp16', gradient_checkpointing=True)
    log = trainer.train(progress=False)
    assert all(torch.isfinite(torch.tensor(e['loss'])) for e in log)
    assert (tmp_path / 'lora' / 'lora_step4.safetensors').exists()


# -- every tool on its default device (CUDA wherever there is one), on the demo assets ------

def run_tool(name, *args):
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', f'{name}.py'), *args],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_correspondence_tool_on_cuda(tiny, tmp_path):
    root = tmp_path / 'SPair-71k'
    write_spair_layout_dataset(str(root), dict(trn=4, val=2, test=2), size=64)
    options = [f"source.model={tiny['sd_model']}",
               f"source.controlnets.canny.model={tiny['controlnet']}",
               f"source.loras.a={tiny['loras']['a']}",
               f"source.loras.b={tiny['loras']['b']}",
               f'data.root={root}', 'data.image_size=64', 'train.steps=2', 'train.val_every=2',
               'num_match_pictures=1']
    config = osp.join(ROOT, 'configs', 'correspondence', 'gate_spair_demo.py')
    for mode in ('train', 'test', 'zero-shot'):
        run_tool('correspondence', mode, config, '--work-dir', str(tmp_path / 'work'),
                 '--no-progress', '--cfg-options', *options)


def test_content_shift_tool_on_cuda(make_demo_cfg, demo_root, tmp_path):
    config = tmp_path / 'config.py'
    make_demo_cfg(tmp_path / 'train', 1).dump(str(config))
    image = osp.join(demo_root, 'images', 'validation', 'ADE_valid_00000000.jpg')
    run_tool('content_shift', str(config), image, '--out', str(tmp_path / 'out'), '--size',
             '64', '--timesteps', '50', '--anchor-timestep', '400', '--steps', '2',
             '--no-progress')


def test_label_scarce_tool_on_cuda(scarce_demo_options, tmp_path):
    root = tmp_path / 'scarce'
    write_ddpm_seg_layout_dataset(str(root), num_train=4, num_test=2, size=32)
    run_tool('label_scarce', osp.join(ROOT, 'configs', 'label_scarce', 'gate_pixel_demo.py'),
             '--splits', '1', '--work-dir', str(tmp_path / 'work'), '--cfg-options',
             *scarce_demo_options,
             f'train_dataloader.dataset.data_root={root}',
             f'test_dataloader.dataset.data_root={root}', 'train_cfg.max_iters=2')


def test_caption_tool_on_cuda(tmp_path):
    from mmseg_gate.testing.captioners import save_random_blip, save_random_clip
    write_ade_layout_dataset(str(tmp_path / 'ade'), num_train=2, num_val=0)
    run_tool('caption', str(tmp_path / 'ade' / 'images' / 'training'), '--out',
             str(tmp_path / 'captions.json'), '--model', save_random_blip(str(tmp_path / 'b')),
             '--clip-model', save_random_clip(str(tmp_path / 'c')), '--max-new-tokens', '4')


def test_train_lora_tool_on_cuda(tiny_sd, tmp_path):
    write_ade_layout_dataset(str(tmp_path / 'ade'), num_train=4, num_val=0)
    run_tool('train_lora', osp.join(ROOT, 'configs', 'lora', 'demo.py'), '--no-progress',
             '--cfg-options', f'model={tiny_sd}',
             f"image_dir={tmp_path / 'ade' / 'images' / 'training'}",
             f"work_dir={tmp_path / 'lora'}", 'num_images=4', 'steps=2', 'save_every=2',
             'batch_size=2')


def test_benchmark_tool_on_cuda():
    run_tool('benchmark', osp.join(ROOT, 'configs', 'gate_upernet_demo.py'), '--shape', '64',
             '64', '--iters', '1', '--random-init', '--arch', 'tiny', '--lora-rank', '4',
             '--naive')
