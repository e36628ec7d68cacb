"""Training, evaluation, checkpointing and resuming through MMEngine's Runner (CPU)."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from mmseg.registry import RUNNERS
from mmseg_gate.demo_data import write_ade_layout_dataset

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016')
    write_ade_layout_dataset(root, num_train=8, num_val=2, seed=0)
    return root


@pytest.fixture
def tiny(tiny_sd, tiny_controlnet, tiny_loras):
    return dict(sd_model=tiny_sd, controlnet=tiny_controlnet, loras=tiny_loras)


def demo_cfg(tiny, data_root, work_dir, max_iters):
    """The demo config (three GATE variants) on the test's tiny models and data."""
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'gate_upernet_demo.py'))
    cfg.model.backbone.sd_model = tiny['sd_model']
    cfg.model.backbone.controlnets.canny.model = tiny['controlnet']
    cfg.model.backbone.loras = dict(tiny['loras'])
    cfg.work_dir = str(work_dir)
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = data_root
    cfg.train_dataloader.batch_size = 2
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = max_iters
    cfg.default_hooks.checkpoint.interval = 2
    cfg.default_hooks.logger.interval = 1
    cfg.param_scheduler[0].end = max_iters
    return cfg


def test_train_evaluate_checkpoint_and_reload(tiny, demo_root, tmp_path):
    runner = RUNNERS.build(demo_cfg(tiny, demo_root, tmp_path / 'run', 4))
    runner.train()
    ckpt = tmp_path / 'run' / 'iter_4.pth'
    assert ckpt.exists()
    state = torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict']
    assert not any('unet' in k or 'vae' in k for k in state)
    assert any(k.startswith('backbone.refiners.') for k in state)
    assert any(k.startswith('backbone.amalgamations.') for k in state)
    trained = runner.model.state_dict()

    cfg = demo_cfg(tiny, demo_root, tmp_path / 'test', 4)
    cfg.load_from = str(ckpt)
    tester = RUNNERS.build(cfg)
    metrics = tester.test()
    assert 'mIoU' in metrics
    reloaded = tester.model.state_dict()
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(trained[k], reloaded[k]) for k in trained)


def test_resume_with_safe_loading(tiny, demo_root, tmp_path):
    RUNNERS.build(demo_cfg(tiny, demo_root, tmp_path, 2)).train()
    cfg = demo_cfg(tiny, demo_root, tmp_path, 4)
    cfg.resume = True
    runner = RUNNERS.build(cfg)
    runner.train()
    assert runner.iter == 4
    assert (tmp_path / 'iter_4.pth').exists()


def test_ade20k_submission_writes_label_maps(tiny, demo_root, tmp_path):
    """The submission config predicts unlabelled test images into ADE's 1-150 id PNGs."""
    import shutil

    import numpy as np
    from PIL import Image
    testing = tmp_path / 'release_test' / 'testing'
    shutil.copytree(osp.join(demo_root, 'images', 'validation'), testing)
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'gate_upernet_ade20k_submit.py'))
    cfg.model = demo_cfg(tiny, demo_root, tmp_path, 1).model
    cfg.work_dir = str(tmp_path / 'work')
    cfg.test_dataloader.dataset.data_root = str(testing.parent)
    cfg.test_dataloader.num_workers = 0
    cfg.test_dataloader.persistent_workers = False
    cfg.test_evaluator.output_dir = str(tmp_path / 'predictions')
    RUNNERS.build(cfg).test()
    images = sorted(p.stem for p in testing.iterdir())
    written = sorted((tmp_path / 'predictions').iterdir())
    assert [p.stem for p in written] == images
    for png in written:
        labels = np.asarray(Image.open(png))
        assert labels.shape == np.asarray(Image.open(testing / (png.stem + '.jpg'))).shape[:2]
        assert labels.min() >= 1 and labels.max() <= 150


def test_distributed_training_without_cuda(tiny, demo_root, tmp_path):
    """tools/dist_train.sh with two gloo processes (MMEngine alone needs CUDA for this)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHON=sys.executable, PORT='29613', CUDA_VISIBLE_DEVICES='')
    options = [f"model.backbone.sd_model={tiny['sd_model']}",
               f"model.backbone.controlnets.canny.model={tiny['controlnet']}",
               f"model.backbone.loras.a={tiny['loras']['a']}",
               f"model.backbone.loras.b={tiny['loras']['b']}",
               f'train_dataloader.dataset.data_root={demo_root}',
               f'val_dataloader.dataset.data_root={demo_root}',
               'train_dataloader.batch_size=2', 'train_cfg.max_iters=2',
               'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=2']
    result = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'),
         osp.join(ROOT, 'configs', 'gate_upernet_demo.py'), '2', '--work-dir', str(tmp_path),
         '--cfg-options', *options],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'iter_2.pth').exists()
    assert 'mIoU' in result.stdout + result.stderr
