"""Semantic correspondence: SPair-71k's layout, PCK, the loss, matching, and the tool."""
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmseg_gate.datasets.spair import load_pairs
from mmseg_gate.protocols.correspondence import (keypoint_loss, match, pck, summarize_pck,
                                                 to_grid)
from mmseg_gate.testing.demo_data import write_spair_layout_dataset

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def spair_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('spair') / 'SPair-71k')
    write_spair_layout_dataset(root, dict(trn=4, val=2, test=2), size=32, num_keypoints=5)
    return root


def test_loader_reads_the_real_layout(spair_root):
    pairs = load_pairs(spair_root, 'trn')
    assert len(pairs) == 4 and {p['category'] for p in pairs} == {'cat', 'dog'}
    pair = pairs[0]
    assert osp.isfile(pair['src_path']) and pair['src_path'].endswith(
        osp.join('JPEGImages', pair['category'], pair['src_imname']))
    assert len(pair['src_kps']) == len(pair['trg_kps']) == 5
    assert len(load_pairs(spair_root, 'trn', categories=['dog'])) == 2
    assert len(load_pairs(spair_root, 'trn', per_category=1)) == 2


def test_loader_errors_name_the_file(spair_root, tmp_path):
    with pytest.raises(FileNotFoundError, match='SPair-71k.tar.gz'):
        load_pairs(str(tmp_path), 'test')
    with pytest.raises(ValueError, match='split'):
        load_pairs(spair_root, 'train')
    broken = str(tmp_path / 'broken')
    write_spair_layout_dataset(broken, dict(test=2), size=32)
    pair = load_pairs(broken, 'test')[1]
    os.remove(pair['trg_path'])
    with pytest.raises(FileNotFoundError, match=pair['trg_imname']):
        load_pairs(broken, 'test')


def test_pck_at_the_threshold_edge():
    pair = dict(trg_kps=[[10, 10], [10, 10], [10, 10], [10, 10]], trg_imsize=[200, 100, 3],
                trg_bndbox=[0, 0, 50, 80])
    # thresholds: image 0.1 * 200 = 20, bbox 0.1 * max(50, 80) = 8
    pred = torch.tensor([[30., 10.], [30.01, 10.], [10., 18.], [10., 18.01]])
    result = pck(pred, pair, 0.1)
    assert result['img'].tolist() == [True, False, True, True]
    assert result['bbox'].tolist() == [False, False, True, False]
    summary = summarize_pck([('cat', result), ('dog', dict(img=np.array([True]),
                                                          bbox=np.array([True])))])
    assert summary['overall']['pck_img'] == pytest.approx(80.0)  # 4 of 5 keypoints
    assert summary['overall']['pck_img_per_pair'] == pytest.approx((75 + 100) / 2)
    assert summary['per_category']['cat']['pck_bbox'] == pytest.approx(25.0)


def test_loss_prefers_matching_features():
    torch.manual_seed(0)
    source = torch.randn(8, 6, 6)
    kps = torch.tensor([[1., 2.], [4., 4.], [3., 0.]])
    shifted = torch.roll(source, shifts=1, dims=2)  # target = source moved right by 1
    good = keypoint_loss(source, shifted, kps, kps + torch.tensor([1., 0.]))
    bad = keypoint_loss(source, shifted, kps, kps)
    assert good < bad
    # features are compared by cosine: a sharp temperature makes the right match certain
    sharp = keypoint_loss(source, shifted, kps, kps + torch.tensor([1., 0.]), temperature=1e-3)
    assert sharp < 1e-3


def test_matching_finds_a_moved_pattern():
    torch.manual_seed(0)
    source = torch.randn(16, 8, 8)
    target = torch.flip(source, dims=[2])  # a mirrored image
    src_kps = torch.tensor([[4., 12.], [28., 20.], [12.5, 30.]])  # pixels of a 32x32 image
    pred = match(source, target, src_kps, (32, 32), (64, 32), upsample=1)
    expected = torch.stack([64 - 2 * src_kps[:, 0] - 1, src_kps[:, 1]], dim=1)
    # each keypoint lands on the mirrored feature cell: within a cell (8 px wide, 4 high)
    assert ((pred - expected).abs() <= torch.tensor([4.5, 2.5])).all()
    grid = to_grid(torch.tensor([[0, 0], [31, 31]]), (32, 32), (8, 8))  # integer keypoints
    assert torch.allclose(grid, torch.tensor([[-0.375, -0.375], [7.375, 7.375]]))


def test_tool_trains_tests_and_draws(spair_root, tiny, tmp_path):
    work = tmp_path / 'work'
    options = [f"source.sd_model={tiny['sd_model']}",
               f"source.controlnets.canny.model={tiny['controlnet']}",
               f"source.loras.a={tiny['loras']['a']}",
               f"source.loras.b={tiny['loras']['b']}",
               f'data.root={spair_root}', 'data.image_size=32', 'train.steps=4',
               'train.val_every=2', 'train.sparsity=0.001', 'num_match_pictures=2']
    config = osp.join(ROOT, 'configs', 'correspondence', 'gate_spair_demo.py')

    def run(*args):
        return subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'correspondence.py'),
                               *args, config, '--work-dir', str(work), '--no-progress',
                               '--cfg-options', *options],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)

    result = run('train')
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((work / 'results_train.json').read_text())
    assert report['split'] == 'test' and report['model_selection']['split'] == 'val'
    assert report['overall']['pairs'] == 2 and set(report['per_category']) == {'cat', 'dog'}
    training = json.loads((work / 'training.json').read_text())
    assert [h['step'] for h in training['history']] == [2, 4]
    # Every image of the pairs extracted once into the store the later modes reuse.
    images = {p[f'{side}_path'] for split in ('trn', 'val', 'test')
              for p in load_pairs(spair_root, split) for side in ('src', 'trg')}
    assert report['feature_store']['images'] == len(images)
    assert report['feature_store']['folder'] == str(work / 'features')
    cost = report['frozen_half']
    assert cost['with_store']['image_forwards'] == len(images)
    assert 0 < cost['without_store']['image_forwards'] <= cost['image_requests']
    from PIL import Image
    assert Image.open(work / 'matches_train.png').size[1] == 2 * 192
    again = run('test')  # the saved best loads completely and gives the same numbers
    assert again.returncode == 0, again.stderr[-3000:]
    tested = json.loads((work / 'results_test.json').read_text())
    assert tested['overall'] == report['overall']
    assert tested['frozen_half']['with_store']['image_forwards'] == 0  # the store reused
    assert run('zero-shot').returncode == 0
    unstored = run('zero-shot', '--no-store')  # the features computed in memory instead
    assert unstored.returncode == 0, unstored.stderr[-3000:]
    assert 'feature_store' not in json.loads((work / 'results_zero_shot.json').read_text())
    (work / 'best.safetensors').write_bytes(b'not a checkpoint')
    broken = run('test')
    assert broken.returncode != 0 and 'best.safetensors' in broken.stderr


def test_the_real_config_builds(tiny):
    """The shipped recipe's extractor builds once pointed at the tiny model."""
    from mmengine.config import Config

    from mmseg_gate import build_source
    from mmseg_gate.protocols.correspondence import CorrespondenceAggregator
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'correspondence', 'gate_spair.py'))
    assert cfg.data.image_size == 512 and cfg.source.timestep == 50
    assert (cfg.train.lr, cfg.train.temperature, cfg.aggregator.projection_dim) == (
        5e-4, 0.07, 384)
    source_cfg = dict(cfg.source)
    source_cfg.update(sd_model=tiny['sd_model'], loras=dict(tiny['loras']),
                      controlnets=dict(canny=dict(model=tiny['controlnet'])),
                      taps=source_cfg['taps'][:3] + ('up_blocks.3.attentions.1', ))
    source = build_source(source_cfg)
    # The authors' six: seed repeats of the prompt and of the denoised ControlNet variant.
    assert [(v.noise_seed, v.denoising_from, bool(v.controlnets), v.lora) for v in
            source.variants] == [(None, None, False, None), (1, None, False, None),
                                    (None, None, False, 'a'), (None, None, False, 'b'),
                                    (None, 60, True, None), (1, 60, True, None)]
    aggregator = CorrespondenceAggregator(source.feature_info, **cfg.aggregator)
    feats = source(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert aggregator(feats).shape == (2, 384, 8, 8)
