"""Training, evaluation, checkpointing and resuming through MMEngine's Runner (CPU)."""
import os
import os.path as osp
import re
import subprocess
import sys

import torch
from mmengine.config import Config

from mmseg.registry import RUNNERS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_train_evaluate_checkpoint_and_reload(make_demo_cfg, tmp_path):
    runner = RUNNERS.build(make_demo_cfg(tmp_path / 'run', 4))
    runner.train()
    ckpt = tmp_path / 'run' / 'iter_4.pth'
    assert ckpt.exists()
    state = torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict']
    assert not any('unet' in k or 'vae' in k for k in state)
    assert any(k.startswith('backbone.fusion.refiners.') for k in state)
    assert any(k.startswith('backbone.fusion.amalgamations.') for k in state)
    trained = runner.model.state_dict()

    cfg = make_demo_cfg(tmp_path / 'test', 4)
    cfg.load_from = str(ckpt)
    tester = RUNNERS.build(cfg)
    metrics = tester.test()
    assert 'mIoU' in metrics
    reloaded = tester.model.state_dict()
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(trained[k], reloaded[k]) for k in trained)


def test_ade20k_submission_writes_label_maps(make_demo_cfg, demo_root, tmp_path):
    """The submission config predicts unlabelled test images into ADE's 1-150 id PNGs."""
    import shutil

    import numpy as np
    from PIL import Image
    testing = tmp_path / 'release_test' / 'testing'
    shutil.copytree(osp.join(demo_root, 'images', 'validation'), testing)
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'gate_upernet_ade20k_submit.py'))
    cfg.model = make_demo_cfg(tmp_path, 1).model
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


def metrics_line(log: str, stage: str) -> str:
    """The last 'aAcc: .. mIoU: .. mAcc: ..' figures logged for ``stage`` (val or test)."""
    found = re.findall(rf'Iter\({stage}\).*?(aAcc: \S+\s+mIoU: \S+\s+mAcc: \S+)', log)
    assert found, log[-3000:]
    return found[-1]


def test_distributed_training_without_cuda(tiny, demo_root, tmp_path, run_tool_here):
    """tools/dist_train.sh with two gloo processes (MMEngine alone needs CUDA for this); the
    validation it logs is that of the checkpoint it saves (tools/test.py agrees)."""
    env = dict(os.environ, PYTHONPATH='', PYTHON=sys.executable, PORT='29613',
               CUDA_VISIBLE_DEVICES='')
    options = [f"model.backbone.source.model={tiny['sd_model']}",
               f"model.backbone.source.controlnets.canny.model={tiny['controlnet']}",
               f"model.backbone.source.loras.a={tiny['loras']['a']}",
               f"model.backbone.source.loras.b={tiny['loras']['b']}",
               f'train_dataloader.dataset.data_root={demo_root}',
               f'val_dataloader.dataset.data_root={demo_root}',
               f'test_dataloader.dataset.data_root={demo_root}',
               'train_dataloader.batch_size=2', 'train_cfg.max_iters=2',
               'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=2']
    config = osp.join(ROOT, 'configs', 'gate_upernet_demo.py')
    result = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), config, '2', '--work-dir',
         str(tmp_path), '--cfg-options', *options],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'iter_2.pth').exists()
    logged = metrics_line(result.stdout + result.stderr, 'val')
    test = run_tool_here('test', config, tmp_path / 'iter_2.pth', '--work-dir',
                         tmp_path / 'test', '--cfg-options', *options)
    assert test.returncode == 0, test.stderr[-3000:]
    assert metrics_line(test.stdout + test.stderr, 'test') == logged


def test_browse_dataset_draws_labelled_samples(demo_root, tmp_path, run_tool_here):
    """MMSeg's own browse_dataset.py fails on any OpenCV (open-mmlab/mmsegmentation#3405)."""
    from PIL import Image
    config = osp.join(ROOT, 'configs', 'gate_upernet_demo.py')
    result = run_tool_here('browse_dataset', config, '--not-show', '--output-dir', tmp_path,
                           '--cfg-options', f'train_dataloader.dataset.data_root={demo_root}')
    assert result.returncode == 0, result.stderr[-3000:]
    pictures = sorted(tmp_path.glob('*.jpg'))
    assert len(pictures) == 8  # the training images
    assert Image.open(pictures[0]).size == (64, 64)  # the demo's crops
