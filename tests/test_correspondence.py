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
from mmseg_gate.testing.demo_data import write_dhf_split_files, write_spair_layout_dataset

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def spair_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('spair') / 'SPair-71k')
    write_spair_layout_dataset(root, dict(trn=4, val=2, test=4), size=32, num_keypoints=5)
    write_dhf_split_files(root, per_file=dict(test=2))  # test-360: a subset of test
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


def test_pck_compares_in_float64_as_diffusion_hyperfeatures():
    """DHF's compute_pck: numpy float64 distances against alpha * max(size). By hand: image
    threshold 20, bbox threshold 0.1 * 30 = 3.0000000000000004. A prediction 20.0000005 px
    away is wrong (float32 rounds it onto 20); one exactly 3 px away is right for the box."""
    pair = dict(trg_kps=[[10, 10], [10, 10], [10, 10]], trg_imsize=[200, 100, 3],
                trg_bndbox=[0, 0, 30, 20])
    pred = torch.tensor([[30.0000005, 10.], [10., 29.9999995], [13., 10.]],
                        dtype=torch.float64)
    result = pck(pred, pair, 0.1)
    assert result['img'].tolist() == [False, True, True]
    assert result['bbox'].tolist() == [False, False, True]


def test_matching_predicts_in_float64():
    source, target = torch.randn(4, 6, 6), torch.randn(4, 6, 6)
    pred = match(source, target, torch.tensor([[3., 5.]]), (37, 41), (333, 227))
    assert pred.dtype == torch.float64


def test_pck_is_an_mmengine_metric():
    from mmengine.evaluator import Evaluator

    import mmseg_gate  # noqa: F401  (registers PCKMetric)
    evaluator = Evaluator([dict(type='PCKMetric', alpha=0.1)])
    pair = dict(trg_kps=[[10, 10], [10, 10]], trg_imsize=[200, 100, 3],
                trg_bndbox=[0, 0, 50, 80], category='cat')
    evaluator.process([dict(pair, pred_kps=torch.tensor([[30.01, 10.], [10., 30.]]))])
    evaluator.process([dict(pair, category='dog', pred_kps=torch.tensor([[10., 10.]] * 2))])
    scores = evaluator.evaluate(2)
    assert scores['spair/pck_img'] == pytest.approx(75.0)  # 3 of 4 within 20 px
    assert scores['spair/pck_bbox'] == pytest.approx(50.0)  # 2 of 4 within 8 px
    assert scores['spair/cat/pck_img'] == pytest.approx(50.0)
    assert scores['spair/dog/pck_bbox_per_pair'] == pytest.approx(100.0)


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


def test_dhf_split_files_read_as_the_layout(spair_root, tmp_path):
    from mmseg_gate.datasets.spair import load_dhf_pairs
    images = osp.join(spair_root, 'JPEGImages')
    dhf = load_dhf_pairs(osp.join(images, 'spair_71k_train.json'), images)
    layout = load_pairs(spair_root, 'trn')
    keys = ('src_path', 'trg_path', 'src_kps', 'trg_kps', 'src_bndbox', 'trg_bndbox',
            'src_imsize', 'trg_imsize', 'category')
    assert [[p[k] for k in keys] for p in dhf] == [[p[k] for k in keys] for p in layout]
    assert len(load_dhf_pairs(osp.join(images, 'spair_71k_test-360.json'), images)) == 2
    entries = json.loads(open(osp.join(images, 'spair_71k_train.json')).read())

    def broken(name, content):
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)

    with pytest.raises(ValueError, match=r'bad\.json.*not valid JSON'):
        load_dhf_pairs(broken('bad.json', '[{"source_path": '), images)
    with pytest.raises(ValueError, match='not the list'):
        load_dhf_pairs(broken('dict.json', {'pairs': entries}), images)
    uneven = [dict(entries[0], target_points=entries[0]['target_points'][:-1])]
    with pytest.raises(ValueError, match=r"Pair 0 of '.*uneven\.json' has 5 source and 4"):
        load_dhf_pairs(broken('uneven.json', uneven), images)
    outside = [entries[0], dict(entries[1], source_points=[[500, 3]] * 5)]
    with pytest.raises(ValueError, match=r'Pair 1 .*outside the 32x32 image'):
        load_dhf_pairs(broken('outside.json', outside), images)
    missing = [dict(entries[0], target_path='cat/nowhere.jpg')]
    with pytest.raises(FileNotFoundError, match=r'nowhere\.jpg'):
        load_dhf_pairs(broken('missing.json', missing), images)
    lacking = [{k: v for k, v in entries[0].items() if k != 'category'}]
    with pytest.raises(ValueError, match=r"lacks \['category'\]"):
        load_dhf_pairs(broken('lacking.json', lacking), images)


def test_the_authors_aggregator():
    """Their AggregationNetwork: one amalgamation of the concatenated conv features, the
    attention maps concatenated unweighted, a 3x3 conv ('conv') or none ('nn')."""
    from mmseg_gate.models.correspondence import GATEAggregationNetwork
    info = [dict(module='conv.a', num_chs=6, num_variants=3),
            dict(module='conv.b', num_chs=4, num_variants=3),
            dict(module='attn.cross_attention_maps', num_chs=5, num_variants=1)]
    torch.manual_seed(0)
    feats = [dict(**{'conv.a': torch.randn(2, 6, 4, 4), 'conv.b': torch.randn(2, 4, 2, 2)})
             for _ in range(3)] + [{'attn.cross_attention_maps': torch.rand(2, 5, 4, 4)}]
    nn_net = GATEAggregationNetwork(info, output='nn', grid=8).eval()
    conv_net = GATEAggregationNetwork(info, output='conv', grid=8).eval()
    out = nn_net(feats)
    assert out.shape == (2, 15, 8, 8) and conv_net(feats).shape == (2, 15, 8, 8)
    assert nn_net.amalgamation.assigners[0].fc.out_features == 10  # a weight per channel
    # The attention maps bypass the amalgamation: nearest-resized, unweighted, last.
    maps = torch.nn.functional.interpolate(feats[-1]['attn.cross_attention_maps'], size=(8, 8))
    torch.testing.assert_close(out[:, 10:], maps)
    # The weighted sum: softmax weights over the three variants, per image and channel.
    weights = nn_net.amalgamation.last_weights[0]  # (V, N, C)
    stacked = torch.stack([torch.cat([torch.nn.functional.interpolate(v[n], size=(8, 8))
                                      for n in ('conv.a', 'conv.b')], dim=1)
                           for v in feats[:3]])
    torch.testing.assert_close(out[:, :10], (weights[..., None, None] * stacked).sum(0))
    torch.testing.assert_close(weights.sum(0), torch.ones(2, 10))
    assert isinstance(conv_net.out_conv, torch.nn.Conv2d) and conv_net.out_conv.bias is None
    assert conv_net.out_conv.kernel_size == (3, 3) and conv_net.out_conv.in_channels == 15
    assert not any(isinstance(m, torch.nn.Conv2d) for m in nn_net.out_conv.modules())
    with pytest.raises(ValueError, match="bypass feature 'attn.cross_attention_maps'"):
        nn_net(feats[:3] + [feats[-1], feats[-1]])
    with pytest.raises(ValueError, match='output must be one of'):
        GATEAggregationNetwork(info, output='mlp')


def test_matching_at_512_as_the_authors():
    """Both maps upsampled to 512 x 512, keypoints scaled without a half-pixel offset."""
    torch.manual_seed(0)
    features = torch.randn(16, 64, 64)
    src = torch.tensor([[100., 50.], [255., 100.], [400., 300.]])  # a 500 x 334 image
    pred = match(features, features, src, (500, 334), (500, 334), size=512,
                 pixel_centres=False)
    # The same map: each keypoint finds its own position at 512 (rounded) and comes back.
    at_512 = (src * torch.tensor([512 / 500, 512 / 334])).round().clamp(0, 511)
    torch.testing.assert_close(pred, at_512.double() * torch.tensor([500 / 512, 334 / 512],
                                                                    dtype=torch.float64))
    grid = to_grid(torch.tensor([[100., 50.]]), (200, 100), (64, 64), pixel_centres=False)
    torch.testing.assert_close(grid, torch.tensor([[32., 32.]]))


def _options(tiny, root, *extra):
    sources = 'source.sources'
    both = ('conv', 'attn')
    return [f"{sources}.{s}.model={tiny['sd_model']}" for s in both] + \
        [f"{sources}.{s}.controlnets.canny.model={tiny['controlnet']}" for s in both] + \
        [f"{sources}.conv.loras.a={tiny['loras']['a']}",
         f"{sources}.conv.loras.b={tiny['loras']['b']}",
         f"{sources}.attn.loras.a={tiny['loras']['a']}",
         f'data.root={root}', 'data.image_size=32', 'aggregator.grid=4', 'matching.size=32',
         'num_match_pictures=2', *_SHORT_DENOISING, *extra]


# The recipe's denoised variants from t = 52 instead of 60: the tool's behaviour is the same,
# at a quarter of the denoising passes (most of these tests' frozen-half time).
_SHORT_DENOISING = [f'source.sources.{place}.denoising_from=52' for place in (
    'conv.variants.4', 'conv.variants.5', 'attn.variants.0')]


def _run_tool(run_tool_here, config, work, options, *args, features=None):
    more = ['--features', str(features)] if features else []
    return run_tool_here('correspondence', *args, config, '--work-dir', work, '--no-progress',
                         *more, '--cfg-options', *options)


@pytest.mark.parametrize('layout', ['dhf', 'spair'])
def test_tool_trains_tests_and_draws(spair_root, tiny, tmp_path, layout, run_tool_here):
    work = tmp_path / 'work'
    options = _options(tiny, spair_root, f'data.split_files={layout}', 'train.steps=4',
                       'train.val_every=2')
    config = osp.join(ROOT, 'configs', 'correspondence', 'gate_spair_demo.py')

    def run(*args):
        return _run_tool(run_tool_here, config, work, options, *args)

    result = run('train')
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((work / 'results_train.json').read_text())
    held_out = ['test-360', 'test'] if layout == 'dhf' else ['test']
    assert report['split'] == held_out[0] and list(report['tests']) == held_out
    assert report['model_selection']['split'] == ('val-360' if layout == 'dhf' else 'val')
    assert report['tests']['test']['pairs'] == 4 and set(report['per_category']) == {
        'cat', 'dog'}
    training = json.loads((work / 'training.json').read_text())
    history = training['history']
    assert [h['step'] for h in history] == [2, 4]
    # The paper's way: the best per-image and per-bbox PCK over validations, independently.
    assert report['paper']['pck_img'] == max(h['pck_img'] for h in history)
    assert report['paper']['pck_bbox'] == max(h['pck_bbox'] for h in history)
    assert not (work / 'last_checkpoint.pt').exists()  # a finished run leaves none
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
    if layout == 'spair':
        return
    again = run('test')  # the saved best loads completely and gives the same numbers
    assert again.returncode == 0, again.stderr[-3000:]
    tested = json.loads((work / 'results_test.json').read_text())
    assert tested['tests'] == report['tests']
    assert tested['frozen_half']['with_store']['image_forwards'] == 0  # the store reused
    assert run('zero-shot').returncode == 0
    unstored = run('zero-shot', '--no-store')  # the features computed in memory instead
    assert unstored.returncode == 0, unstored.stderr[-3000:]
    assert 'feature_store' not in json.loads((work / 'results_zero_shot.json').read_text())
    (work / 'best.safetensors').write_bytes(b'not a checkpoint')
    broken = run('test')
    assert broken.returncode != 0 and 'best.safetensors' in broken.stderr


def test_a_killed_training_resumes_exactly(spair_root, tiny, tmp_path, run_tool_here):
    import signal
    import time
    config = osp.join(ROOT, 'configs', 'correspondence', 'gate_spair_demo.py')
    options = _options(tiny, spair_root, 'train.steps=24', 'train.val_every=2')
    features = tmp_path / 'features'
    whole = _run_tool(run_tool_here, config, tmp_path / 'whole', options, 'train', features=features)
    assert whole.returncode == 0, whole.stderr[-3000:]
    work = tmp_path / 'killed'
    command = [sys.executable, osp.join(ROOT, 'tools', 'correspondence.py'), 'train', config,
               '--work-dir', str(work), '--no-progress', '--features', str(features),
               '--cfg-options', *options]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while process.poll() is None:
        if (work / 'last_checkpoint.pt').exists():
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert process.wait() == -signal.SIGKILL
    resumed = _run_tool(run_tool_here, config, work, options, 'train', features=features)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resuming' in resumed.stdout
    for name in ('best.safetensors', 'training.json'):
        assert (work / name).read_bytes() == (tmp_path / 'whole' / name).read_bytes(), name
    first = json.loads((tmp_path / 'whole' / 'results_train.json').read_text())
    second = json.loads((work / 'results_train.json').read_text())
    assert first['tests'] == second['tests'] and first['paper'] == second['paper']
    # A damaged last checkpoint: one clear message of ours, no traceback.
    damaged = tmp_path / 'damaged'
    damaged.mkdir()
    (damaged / 'last_checkpoint.pt').write_bytes(b'PK\x03\x04 torn')
    broken = _run_tool(run_tool_here, config, damaged, options, 'train', features=features)
    assert broken.returncode == 1 and 'Traceback' not in broken.stderr, broken.stderr[-3000:]
    assert f"[correspondence] error: Checkpoint '{damaged / 'last_checkpoint.pt'}' cannot " \
        'be read' in broken.stderr


def test_training_on_two_processes(spair_root, tiny, tmp_path):
    config = osp.join(ROOT, 'configs', 'correspondence', 'gate_spair_demo.py')
    work = tmp_path / 'work'
    env = dict(os.environ, PYTHON=sys.executable, PORT='29631', PYTHONPATH='',
               OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    result = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_correspondence.sh'), config, '2',
         '--work-dir', str(work), '--no-progress', '--cfg-options',
         *_options(tiny, spair_root, 'train.steps=4', 'train.val_every=2')],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("the paper's way") == 1  # rank 0 reports
    training = json.loads((work / 'training.json').read_text())
    assert [h['step'] for h in training['history']] == [2, 4]
    report = json.loads((work / 'results_train.json').read_text())
    assert list(report['tests']) == ['test-360', 'test']


def test_gate_with_dinov2_trains_and_runs_zero_shot(spair_root, tiny, tmp_path,
                                                   run_tool_here):
    config = osp.join(ROOT, 'configs', 'correspondence', 'gate_dinov2_spair_demo.py')
    options = _options(tiny, spair_root, f"source.sources.dino.model={tiny['dinov2']}",
                       'train.steps=2', 'train.val_every=2')
    features = tmp_path / 'features'
    trained = _run_tool(run_tool_here, config, tmp_path / 'work', options, 'train', features=features)
    assert trained.returncode == 0, trained.stderr[-3000:]
    report = json.loads((tmp_path / 'work' / 'results_train.json').read_text())
    assert report['tests']['test-360']['pairs'] == 2
    zero = _run_tool(run_tool_here, config, tmp_path / 'work', options, 'zero-shot', features=features)
    assert zero.returncode == 0, zero.stderr[-3000:]
    assert json.loads((tmp_path / 'work' / 'results_zero_shot.json').read_text())[
        'frozen_half']['with_store']['image_forwards'] == 0  # one store for both modes


def test_zero_shot_fusion_normalises_and_weights_each_source():
    from mmseg_gate.protocols.correspondence import raw_features
    torch.manual_seed(0)
    sd = [{'conv.a': torch.randn(1, 3, 4, 4)} for _ in range(2)]
    dino = [{'dino.last_hidden_state': torch.randn(1, 5, 2, 2) * 100}]
    fused = raw_features(sd + dino, weights=dict(dino=0.5))
    assert fused.shape == (1, 8, 4, 4)
    torch.testing.assert_close(fused[:, :3].norm(dim=1), torch.ones(1, 4, 4))
    torch.testing.assert_close(fused[:, 3:].norm(dim=1), torch.full((1, 4, 4), 0.5))
    alone = raw_features(sd)  # one source: the variants' mean, as before
    torch.testing.assert_close(alone, torch.stack(
        [torch.nn.functional.normalize(v['conv.a'], dim=1) for v in sd]).mean(0))


def test_the_real_config_builds(tiny):
    """The shipped recipe (the authors' six variants and their separate attention run, their
    aggregation network) builds once pointed at the tiny model."""
    from mmengine.config import Config

    from mmseg_gate import build_source
    from mmseg_gate.models.correspondence import build_aggregator
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'correspondence', 'gate_spair.py'))
    conv, attn = cfg.source.sources.conv, cfg.source.sources.attn
    assert cfg.data.image_size == 512 and conv.timestep == attn.timestep == 50
    assert cfg.data.split_files == 'dhf' and cfg.data.full_test
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.temperature, cfg.train.steps,
            cfg.train.steps_per_epoch, cfg.train.sparsity) == (
        5e-4, 0.01, 0.07, 10000, 5000, 'random_walk')
    assert (cfg.aggregator.type, cfg.aggregator.output, cfg.aggregator.grid) == (
        'GATEAggregationNetwork', 'conv', 64)
    assert cfg.matching == dict(size=512, pixel_centres=False)
    assert attn.taps == () and attn.variants == [
        dict(controlnets=dict(canny=1.0), lora='a', denoising_from=60)]
    for part in (conv, attn):
        part.update(model=tiny['sd_model'], controlnets=dict(canny=dict(
            model=tiny['controlnet'])), loras={k: tiny['loras']['a'] for k in part.loras})
    conv.taps = conv.taps[:3] + ('up_blocks.3.attentions.1', )
    source = build_source(cfg.source)
    # The authors' six: seed repeats of the prompt and of the denoised ControlNet variant.
    assert [(v.noise_seed, v.denoising_from, bool(v.controlnets), v.lora) for v in
            source.sources['conv'].variants] == [
        (None, None, False, None), (1, None, False, None), (None, None, False, 'a'),
        (None, None, False, 'b'), (None, 60, True, None), (1, 60, True, None)]
    assert [f['module'] for f in source.feature_info][-1] == 'attn.cross_attention_maps'
    aggregator = build_aggregator(dict(cfg.aggregator, grid=8), source.feature_info)
    feats = source(torch.rand(2, 3, 64, 64) * 2 - 1)
    width = sum(f['num_chs'] for f in source.feature_info)  # the taps' channels + 154
    assert aggregator(feats).shape == (2, width, 8, 8) and width == aggregator.out_channels
    hyper = Config.fromfile(osp.join(ROOT, 'configs', 'correspondence',
                                     'gate_spair_hyperfeatures.py'))
    assert build_aggregator(hyper.aggregator, source.feature_info)(feats).shape[1] == 384
    assert Config.fromfile(osp.join(ROOT, 'configs', 'correspondence',
                                    'gate_spair_nn.py')).aggregator.output == 'nn'
    fused = Config.fromfile(osp.join(ROOT, 'configs', 'correspondence',
                                     'gate_dinov2_spair.py'))
    assert fused.source.sources.dino.type == 'DINOv2Source'
    assert fused.aggregator.bypass == ('attn.cross_attention_maps', 'dino.last_hidden_state')
    authors = Config.fromfile(osp.join(ROOT, 'configs', 'correspondence',
                                       'gate_spair_authors.py'))
    assert authors.train == dict(cfg.train, val_mode='train', val_offset=1, val_last=False)
    assert cfg.train.get('val_mode', 'eval') == 'eval'


def test_validation_in_train_mode_as_the_authors(spair_root, tmp_path):
    """``val_mode='train'``: each pair in one batch through the network in train mode
    (BatchNorm over the pair, dropout active), as the authors' validation; written out here
    with the network and ``match``. Validation leaves the BatchNorm statistics."""
    from mmseg_gate.protocols.correspondence.metric import evaluate
    from mmseg_gate.models.correspondence import GATEAggregationNetwork
    from mmseg_gate.protocols.correspondence.training import (aggregated, in_train_mode,
                                                               train_aggregator, validate)
    info = [dict(module='conv.a', num_chs=6, num_variants=2),
            dict(module='attn.cross_attention_maps', num_chs=3, num_variants=1)]
    pairs = load_pairs(spair_root, 'val') + load_pairs(spair_root, 'trn')
    paths = sorted({p[k] for p in pairs for k in ('src_path', 'trg_path')})
    torch.manual_seed(0)
    feats = {path: [{'conv.a': torch.randn(1, 6, 4, 4) * (i + 1) + i} for _ in range(2)]
             + [{'attn.cross_attention_maps': torch.rand(1, 3, 4, 4)}]
             for i, path in enumerate(paths)}
    net = GATEAggregationNetwork(info, output='conv', grid=8,
                                 assigner_cfg=dict(dropout_ratio=0.0))
    outputs, predictions = [], []
    for pair in pairs:
        both = [{k: torch.cat([feats[pair['src_path']][v][k], feats[pair['trg_path']][v][k]])
                 for k in feats[pair['src_path']][v]} for v in range(3)]
        with torch.no_grad():
            out = net.train()(both)
        outputs.append(out)
        predictions.append(match(out[0], out[1],
                                 torch.tensor(pair['src_kps'], dtype=torch.float32),
                                 tuple(pair['src_imsize'][:2]), tuple(pair['trg_imsize'][:2])))
    features = in_train_mode(net, feats.__getitem__)
    first = features(pairs[0]['src_path'], pairs[0]['trg_path'])
    assert torch.equal(first[0], outputs[0][0]) and torch.equal(first[1], outputs[0][1])
    other = next(p for p in paths if p not in (pairs[0]['src_path'], pairs[0]['trg_path']))
    assert not torch.allclose(features(pairs[0]['src_path'], other)[0], first[0])  # the pair's BN
    net.eval()
    assert not torch.allclose(aggregated(net, feats.__getitem__)(pairs[0]['src_path']), first[0])
    _, predicted = evaluate(pairs, None, pair_features=features, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(predicted, predictions))
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    validate(net, feats.__getitem__, pairs, 0.1, val_mode='train')
    assert all(torch.equal(v, buffers[k]) for k, v in net.named_buffers())
    # Dropout active: validations are noisy, the paper reports their maximum.
    noisy = GATEAggregationNetwork(info, output='nn', grid=8,
                                   assigner_cfg=dict(dropout_ratio=0.5))
    weights = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        noisy.train()(feats[paths[0]])
        weights.append(noisy.amalgamation.last_weights[0].clone())
    assert not torch.equal(*weights)
    work = tmp_path / 'work'
    work.mkdir()
    log = train_aggregator(noisy, feats.__getitem__, pairs, pairs, str(work), steps=3,
                           val_every=1, val_mode='train', progress=False)
    assert [h['step'] for h in log['history']] == [1, 2, 3]
    assert log['paper']['pck_bbox'] == max(h['pck_bbox'] for h in log['history'])
    assert json.loads((work / 'training.json').read_text())['history'] == log['history']
    with pytest.raises(ValueError, match="val_mode must be one of .*'dropout'"):
        train_aggregator(noisy, feats.__getitem__, pairs, pairs, str(work), steps=1,
                         val_mode='dropout', progress=False)
    # The authors' schedule: their 0-based step counter validates after 501, 1001, ... updates,
    # never after the last.
    theirs = train_aggregator(noisy, feats.__getitem__, pairs, pairs, str(tmp_path / 'theirs'),
                              steps=6, val_every=2, val_offset=1, val_last=False,
                              progress=False)
    assert [h['step'] for h in theirs['history']] == [3, 5]
    with pytest.raises(ValueError, match='never validate'):
        train_aggregator(noisy, feats.__getitem__, pairs, pairs, str(work), steps=2,
                         val_every=2, val_offset=1, val_last=False, progress=False)


def test_assigner_settings_live_in_assigner_cfg():
    """The weight assigner owns its defaults; the aggregators pass ``assigner_cfg`` through
    and name it when given the old keyword arguments."""
    from mmseg_gate.models.correspondence import (CorrespondenceAggregator,
                                                  GATEAggregationNetwork)
    info = [dict(module='conv.a', num_chs=6, num_variants=2),
            dict(module='attn.cross_attention_maps', num_chs=3, num_variants=1)]
    net = GATEAggregationNetwork(info, assigner_cfg=dict(dropout_ratio=0.25))
    assigner = net.amalgamation.assigners[0]
    assert assigner.dropout.p == 0.25 and assigner.fc.in_features == 128
    assert assigner.conv_init == 'kaiming'
    for cls, extra in ((GATEAggregationNetwork, {}), (CorrespondenceAggregator, {})):
        with pytest.raises(TypeError, match=r"assigner_cfg=\{'conv_init': 'pytorch'\}"):
            cls(info[:1], conv_init='pytorch', **extra)


def test_matching_at_the_original_size_as_dift():
    """DIFT's and DiTF's matching: each map upsampled to its own image's size, the keypoint's
    vector at its pixel, the argmax pixel as the prediction."""
    torch.manual_seed(0)
    features = torch.randn(16, 30, 40)
    src = torch.tensor([[10., 7.], [351., 248.], [200., 150.]])  # a 400 x 300 image
    pred = match(features, features, src, (400, 300), (400, 300), size='original',
                 pixel_centres=False)
    torch.testing.assert_close(pred, src.double())  # the same map: each finds its own pixel


def test_ditf_protocol_runs_zero_shot_on_the_demo_pairs(spair_root, tmp_path, run_tool_here):
    """The shipped DiTF config end to end (zero-shot) on a tiny FLUX: longest-side resize
    to multiples of 16, the AdaLN treatment, an ensemble, matching at the original size."""
    from mmseg_gate.testing.dit_architectures import save_random_flux
    flux = save_random_flux(str(tmp_path / 'flux'))
    config = osp.join(ROOT, 'configs', 'correspondence', 'ditf_spair.py')
    work = tmp_path / 'work'
    options = [f'source.model={flux}', "source.taps=['single_transformer_blocks.0']",
               'source.discard_channels=auto', 'source.ensemble_size=2',
               'source.frozen_dtype=float32', f'data.root={spair_root}', 'data.image_size=56',
               'num_match_pictures=2']
    result = _run_tool(run_tool_here, config, work, options, 'zero-shot')
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((work / 'results_zero_shot.json').read_text())
    assert report['matching'] == dict(size='original', pixel_centres=False)
    assert report['tests']['test']['pairs'] == 4
    assert 0 <= report['overall']['pck_bbox'] <= 100
    manifest = json.loads((work / 'features' / 'manifest.json').read_text())
    header = manifest['header']['source']
    assert header['tap_transform'] == 'adaln' and header['ensemble_size'] == 2
    # 56 on the longer side of the 32 x 32 demo images, rounded to multiples of 16: 64 x 64.
    shapes = {tuple(r['shape']) for r in manifest['records'].values()} \
        if isinstance(manifest['records'], dict) else {tuple(r['shape'])
                                                      for r in manifest['records']}
    assert shapes == {(3, 64, 64)}


def test_an_unknown_resize_is_named():
    from mmengine.config import ConfigDict

    from mmseg_gate.protocols.correspondence.features import image_reader
    with pytest.raises(ValueError, match=r"data.resize must be one of \('square', 'longest'\)"):
        image_reader(ConfigDict(resize='crop', image_size=64))
