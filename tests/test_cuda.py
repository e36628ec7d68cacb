"""The accelerator path. These run only where CUDA is available and visible
(``GATE_TEST_CUDA=1 bash tools/run_tests.sh``); elsewhere they are skipped, and the same code
paths run on the CPU in the other tests (bfloat16 frozen parts, device arguments)."""
import pytest
import torch

from mmseg.registry import MODELS, RUNNERS
from mmseg_gate import GATEFeatureExtractor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_half_frozen_parts_match_float32(gate_kwargs, dtype):
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    reference = GATEFeatureExtractor(**gate_kwargs)(images)
    low = GATEFeatureExtractor(**dict(gate_kwargs, frozen_dtype=dtype)).to('cuda')
    assert low.unet.dtype == getattr(torch, dtype)
    for ours, ref in zip(low(images.cuda()), reference):  # mixed-adapter batch on CUDA
        for tap in ref:
            error = (ours[tap].float().cpu() - ref[tap]).abs().mean()
            assert error < 0.05 * ref[tap].abs().mean(), tap


def test_model_cuda_places_everything(make_demo_cfg, tmp_path):
    model = MODELS.build(make_demo_cfg(tmp_path, 1).model).cuda().eval()
    extractor = model.backbone.extractor
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
    import os.path as osp

    from mmengine.config import Config

    from mmseg_gate.models.diffusion.lora_training import LoRATrainer
    from mmseg_gate.testing.demo_data import write_ade_layout_dataset
    from conftest import ROOT
    write_ade_layout_dataset(str(tmp_path / 'ade'), num_train=4, num_val=0)
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'lora', 'demo.py'))
    cfg.merge_from_dict(dict(sd_model=tiny_sd, image_dir=str(tmp_path / 'ade/images/training'),
                             work_dir=str(tmp_path / 'lora'), num_images=4, steps=4,
                             save_every=4, batch_size=2))
    trainer = LoRATrainer(cfg, torch.device('cuda'), 'fp16', gradient_checkpointing=True)
    log = trainer.train(progress=False)
    assert all(torch.isfinite(torch.tensor(e['loss'])) for e in log)
    assert (tmp_path / 'lora' / 'lora_step4.safetensors').exists()
