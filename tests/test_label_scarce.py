"""Label-scarce segmentation: the benchmark's layout and rules, the pixel-classifier head,
the split protocol and the tool end to end on the tiny model."""
import json
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.structures import PixelData

import mmseg_gate  # noqa: F401
from mmseg.registry import DATASETS, MODELS
from mmseg.structures import SegDataSample
from mmseg_gate.datasets.label_scarce import IgnoreSmallRegions, LoadNpyAnnotations
from mmseg_gate.protocols.label_scarce import fixed_split, list_images, make_splits
from mmseg_gate.testing.demo_data import write_ddpm_seg_layout_dataset

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CLASSES = ('wall', 'building', 'sky', 'floor', 'tree')


@pytest.fixture(scope='module')
def scarce_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('scarce') / 'horse_21')
    write_ddpm_seg_layout_dataset(root, num_train=6, num_test=4, size=32)
    return root


def build_dataset(root, folder='real/train', **kwargs):
    cfg = dict(type='DDPMSegDataset', data_root=root, metainfo=dict(classes=CLASSES),
               data_prefix=dict(img_path=folder, seg_map_path=folder),
               pipeline=[dict(type='LoadNpyAnnotations')])
    cfg.update(kwargs)
    return DATASETS.build(cfg)


def test_dataset_reads_the_benchmark_layout(scarce_root):
    dataset = build_dataset(scarce_root)
    assert len(dataset) == 6 and dataset.metainfo['classes'] == CLASSES
    sample = dataset[0]
    expected = np.load(osp.join(scarce_root, 'real', 'train', '0.npy'))
    assert sample['img_path'].endswith(osp.join('real', 'train', '0.png'))
    assert np.array_equal(sample['gt_seg_map'], expected) and expected.max() <= 4


def test_dataset_errors_name_the_problem(scarce_root, tmp_path):
    with pytest.raises(FileNotFoundError, match='download_datasets'):
        build_dataset(str(tmp_path))
    with pytest.raises(ValueError, match='metainfo'):
        DATASETS.build(dict(type='DDPMSegDataset', data_root=scarce_root,
                            data_prefix=dict(img_path='real/train',
                                             seg_map_path='real/train')))
    broken = tmp_path / 'broken'
    write_ddpm_seg_layout_dataset(str(broken), num_train=3, num_test=1, size=32)
    (broken / 'real' / 'train' / '1.npy').unlink()
    with pytest.raises(FileNotFoundError, match=r"1\.npy"):
        build_dataset(str(broken))


def test_label_files_never_unpickle(tmp_path):
    path = str(tmp_path / 'label.npy')
    np.save(path, np.array([{'a': 1}], dtype=object), allow_pickle=True)
    results = dict(seg_map_path=path, reduce_zero_label=False, seg_fields=[])
    with pytest.raises(ValueError, match='not a plain numpy array'):
        LoadNpyAnnotations()(results)
    np.save(path, np.full((4, 4), 300, dtype=np.int32))
    with pytest.raises(ValueError, match='0-255'):
        LoadNpyAnnotations()(results)


def test_bedroom_ignores_its_background(tmp_path):
    path = str(tmp_path / 'label.npy')
    np.save(path, np.array([[0, 1], [28, 255]], dtype=np.uint8))
    results = LoadNpyAnnotations()(dict(seg_map_path=path, reduce_zero_label=True,
                                        seg_fields=[]))
    assert results['gt_seg_map'].tolist() == [[255, 0], [27, 255]]
    dataset_cls = DATASETS.get('Bedroom28Dataset')
    assert len(dataset_cls.METAINFO['classes']) == 28
    assert len(DATASETS.get('Horse21Dataset').METAINFO['classes']) == 21


def test_small_regions_are_ignored_in_training():
    label = np.zeros((10, 10), dtype=np.uint8)
    label[0, :19 // 2] = 1  # 9 pixels of class 1
    label[5:7, :10] = 2  # 20 pixels of class 2
    label[9, 9] = 255
    out = IgnoreSmallRegions(min_pixels=20)(dict(gt_seg_map=label.copy()))['gt_seg_map']
    assert (out[label == 1] == 255).all() and (out[label == 2] == 2).all()
    assert (out[label == 0] == 0).all() and out[9, 9] == 255


def make_head(**kwargs):
    cfg = dict(type='PixelClassifierHead', in_channels=[6, 4], num_classes=5, feature_size=8,
               num_classifiers=3, loss_decode=dict(type='CrossEntropyLoss'))
    cfg.update(kwargs)
    head = MODELS.build(cfg)
    head.init_weights()
    return head


def test_head_members_are_independent_mlps():
    head = make_head().eval()
    for bn in (head.members[2], head.members[5]):  # non-trivial statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    inputs = [torch.randn(2, 6, 8, 8), torch.randn(2, 4, 4, 4)]
    logits = head.member_logits(inputs)
    assert logits.shape == (2, 3, 5, 8, 8)
    x = torch.cat([inputs[0], F.interpolate(inputs[1], size=(8, 8), mode='bilinear')], 1)
    conv1, bn1, conv2, bn2, conv3 = (head.members[i] for i in (0, 2, 3, 5, 6))
    for k in range(3):
        def part(module, size):
            return slice(k * size, (k + 1) * size)
        h = F.conv2d(x, conv1.weight[part(conv1, 128)], conv1.bias[part(conv1, 128)]).relu()
        h = F.batch_norm(h, bn1.running_mean[part(bn1, 128)], bn1.running_var[part(bn1, 128)],
                         bn1.weight[part(bn1, 128)], bn1.bias[part(bn1, 128)])
        h = F.conv2d(h, conv2.weight[part(conv2, 32)], conv2.bias[part(conv2, 32)]).relu()
        h = F.batch_norm(h, bn2.running_mean[part(bn2, 32)], bn2.running_var[part(bn2, 32)],
                         bn2.weight[part(bn2, 32)], bn2.bias[part(bn2, 32)])
        out = F.conv2d(h, conv3.weight[part(conv3, 5)], conv3.bias[part(conv3, 5)])
        torch.testing.assert_close(logits[:, k], out, rtol=1e-4, atol=1e-5)


def test_head_vote_and_mean():
    head = make_head().eval()
    logits = torch.zeros(1, 3, 5, 1, 2)
    logits[0, :, :, 0, 0] = torch.tensor([[0, 9, 0, 0, 0], [0, 9, 0, 0, 0], [0, 0, 9, 0, 0]])
    logits[0, :, :, 0, 1] = torch.tensor([[0, 0, 0, 9, 0], [0, 0, 0, 0, 9], [0, 0, 0, 5, 0]])
    head.member_logits = lambda inputs: logits
    votes = head(None)
    assert votes[0, :, 0, 0].tolist() == pytest.approx([0, 2 / 3, 1 / 3, 0, 0])
    assert votes[0, :, 0, 1].argmax() == 3
    head.ensemble = 'mean'
    torch.testing.assert_close(head(None), logits.softmax(2).mean(1))


def test_head_predicts_the_vote_at_the_label_size():
    """The vote reaches the argmax unchanged: no bilinear round trip through the model's
    input size (512) and back to the labels' (the benchmark's argmax of the vote)."""
    head = make_head().eval()
    votes = torch.rand(1, 5, 8, 8)
    metas = [dict(img_shape=(16, 16), ori_shape=(8, 8), padding_size=[0, 0, 0, 0])]
    assert torch.equal(head.predict_by_feat(votes, metas), votes)
    head.predict_at_label_size = False  # MMSeg's way: resized to the input, then back
    round_trip = F.interpolate(head.predict_by_feat(votes, metas), size=(8, 8),
                               mode='bilinear', align_corners=False)
    assert not torch.equal(round_trip, votes)


def test_head_trains_each_member():
    head = make_head().train()
    inputs = [torch.randn(2, 6, 8, 8), torch.randn(2, 4, 4, 4)]
    samples = []
    for _ in range(2):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, 16, 16)))
        samples.append(sample)
    losses = head.loss(inputs, samples, None)
    losses['loss_ce'].backward()
    last = head.members[6].weight.grad.view(3, 5, -1)
    assert set(losses) == {'loss_ce', 'acc_seg'}
    assert all(last[k].abs().sum() > 0 for k in range(3))


def test_splits_keep_sizes_and_are_reproducible():
    train, test = [f'real/train/{i}' for i in range(6)], [f'real/test/{i}' for i in range(4)]
    splits = make_splits(train, test, 3, seed=0)
    assert splits[0] == dict(name='fixed', train=train, test=test)
    for split in splits[1:]:
        assert len(split['train']) == 6 and len(split['test']) == 4
        assert sorted(split['train'] + split['test']) == sorted(train + test)
    assert len({tuple(s['train']) for s in splits}) == 4
    assert make_splits(train, test, 3, seed=0) == splits


def test_the_fixed_split_takes_the_first_sorted_images():
    """DDPM-segmentation's split: the first training_number / testing_number files in sorted
    order; the random re-splits shuffle exactly those."""
    train = [f'real/train/{name}' for name in ('b', 'a', 'd', 'c', 'e')]
    test = [f'real/test/{name}' for name in ('z', 'x', 'y')]
    fixed = fixed_split(train, test, num_train=3, num_test=2)
    assert fixed == dict(name='fixed', train=['real/train/a', 'real/train/b', 'real/train/c'],
                         test=['real/test/x', 'real/test/y'])
    splits = make_splits(train, test, 2, num_train=3, num_test=2)
    assert splits[0] == fixed
    assert all(sorted(s['train'] + s['test']) == sorted(fixed['train'] + fixed['test'])
               and len(s['train']) == 3 for s in splits[1:])
    # The counts are caps (DDPM-segmentation slices the sorted lists): fewer images, all used.
    assert fixed_split(train, test, num_test=4)['test'] == sorted(test)


def _benchmark_miou(pred, label, classes, ignore_index=255):
    """The benchmark's metric through MMEngine's evaluator, as a config runs it."""
    from mmengine.evaluator import Evaluator
    evaluator = Evaluator([dict(type='BenchmarkIoUMetric', ignore_index=ignore_index),
                           dict(type='IoUMetric', iou_metrics=['mIoU'], prefix='mmseg')])
    evaluator.dataset_meta = dict(classes=classes)
    samples = [dict(pred_sem_seg=dict(data=torch.tensor(p)[None]),
                    gt_sem_seg=dict(data=torch.tensor(g)[None])) for p, g in zip(pred, label)]
    evaluator.process(samples)
    return evaluator.evaluate(len(samples))


def test_benchmark_metric_scores_as_compute_iou():
    """Cases computed by hand with DDPM-segmentation's compute_iou rule."""
    classes = ('a', 'b', 'c')
    # Class c is absent from labels and predictions: IoU 0 (MMSeg leaves it out).
    pred, label = [[[0, 0], [1, 1]]], [[[0, 1], [1, 1]]]
    # a: I 1, U 2 -> 0.5; b: I 2, U 3 -> 2/3; c: 0.
    scores = _benchmark_miou(pred, label, classes)
    assert scores['mIoU'] == pytest.approx(100 * (0.5 + 2 / 3 + 0) / 3, abs=1e-4)
    assert scores['mmseg/mIoU'] == pytest.approx(100 * (0.5 + 2 / 3) / 2, abs=0.01)
    # Ignored pixels (Bedroom's background after reduce_zero_label) predicted as a class
    # count in that class's union: a: I 1, U 3; b: I 1, U 1; c: I 0, U 1 (only predicted on
    # an ignored pixel).
    pred, label = [[[0, 0, 0], [1, 2, 2]]], [[[0, 255, 255], [1, 255, 255]]]
    scores = _benchmark_miou(pred, label, classes)
    assert scores['mIoU'] == pytest.approx(100 * (1 / 3 + 1 + 0) / 3, abs=1e-4)
    # Sums over the test set, not a mean of per-image IoUs: a: I 1 + 0, U 1 + 1.
    pred, label = [[[0]], [[1]]], [[[0]], [[0]]]
    scores = _benchmark_miou(pred, label, ('a', 'b'))
    assert scores['mIoU'] == pytest.approx(100 * (0.5 + 0) / 2, abs=1e-4)


def test_benchmark_metric_leaves_an_ignore_label_inside_the_classes_out():
    """DDPM-segmentation's own bedroom_28/ddpm.json: ``ignore_label`` 0 of 29 classes.
    compute_iou skips class 0 in the mean; its pixels still count in the union of the class
    predicted there. By hand: b (1): I 1, U 2 (one 0-labelled pixel predicted b) -> 0.5;
    c (2): I 1, U 1 -> 1; d (3): absent from both -> 0. Mean over b, c, d, not a, b, c, d."""
    classes = ('background', 'b', 'c', 'd')
    pred, label = [[[0, 1, 1], [2, 0, 0]]], [[[0, 0, 1], [2, 0, 0]]]
    scores = _benchmark_miou(pred, label, classes, ignore_index=0)
    assert scores['mIoU'] == pytest.approx(100 * (0.5 + 1 + 0) / 3, abs=1e-4)


def test_tool_runs_the_protocol_and_resumes(scarce_root, scarce_demo_options, tmp_path,
                                            run_tool_here):
    work = tmp_path / 'work'
    options = [*scarce_demo_options,
               f'train_dataloader.dataset.data_root={scarce_root}',
               f'test_dataloader.dataset.data_root={scarce_root}',
               'train_cfg.max_iters=3', 'default_hooks.logger.interval=1']
    command = [osp.join(ROOT, 'configs', 'label_scarce', 'gate_pixel_demo.py'), '--splits',
               '1', '--work-dir', str(work), '--cfg-options', *options]
    result = run_tool_here('label_scarce', *command)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((work / 'label_scarce.json').read_text())
    assert set(report['splits']) == {'fixed', 'random0'}
    summary = report['summary']
    assert 0 <= summary['fixed_split'] <= 100 and summary['random_splits']['n'] == 1
    assert set(report['protocols']) == {'fixed_split', 'random_splits'}
    assert {'mIoU', 'mmseg/mIoU'} <= set(report['splits']['fixed'])
    assert len(report['split_lists']['random0']['train']) == 6
    assert list_images(scarce_root, 'real/test', '.png') == \
        report['split_lists']['fixed']['test']
    # The frozen half ran once per image (a store of train + test), not once per step.
    cost = report['frozen_half']
    assert cost['with_store'] == dict(image_forwards=10, extracted_this_run=10,
                                      flops=10 * cost['per_image']['flops'])
    # The pixel ensemble (the demo's default): the reference codes extract each image per run.
    assert cost['without_store']['image_forwards'] == 2 * (6 + 4)
    assert sorted(p.name for p in (work / 'fixed').glob('member_*')) == [
        f'member_{k}.safetensors' for k in range(3)]
    # Per image: a UNet pass per SD variant, an ADM pass per step.
    assert cost['per_image']['passes']['unet_passes'] == 3 + 3
    assert report['features'] == str(work / 'features')
    again = run_tool_here('label_scarce', *command)
    assert again.returncode == 0 and again.stdout.count('done before') == 2
    report = json.loads((work / 'label_scarce.json').read_text())
    assert report['frozen_half']['with_store']['extracted_this_run'] == 0
    # The MMSeg segmentor instead of the pixel ensemble, on the same store.
    segmentor = run_tool_here(
        'label_scarce', *command[:2], '0', '--work-dir', tmp_path / 'segmentor', '--features',
        work / 'features', *command[5:], 'pixel_ensemble=None')
    assert segmentor.returncode == 0, segmentor.stderr[-3000:]
    report = json.loads((tmp_path / 'segmentor' / 'label_scarce.json').read_text())
    assert report['frozen_half']['without_store']['image_forwards'] == 3 * 2 + 4
    assert not list((tmp_path / 'segmentor' / 'fixed').glob('member_*'))


@pytest.mark.parametrize('name,classes,dataset,checkpoint', [
    ('horse21', 21, 'Horse21Dataset', 'lsun_horse.pt'),
    ('bedroom28', 28, 'Bedroom28Dataset', 'lsun_bedroom.pt')])
def test_real_configs_build(name, classes, dataset, checkpoint, tiny):
    """The shipped recipes: SD1.5's 3,674 channels per pixel with only the ControlNet
    variant denoised from 60, and DDPM-segmentation's ADM (2,816 channels per step) beside
    them; they build once pointed at the tiny models (their taps and channels)."""
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'label_scarce', f'gate_pixel_{name}.py'))
    head, composite = cfg.model.decode_head, cfg.model.backbone.source
    sd, adm = composite.sources.sd, composite.sources.adm
    assert composite.type == 'CompositeSource' and composite.mode == 'separate'
    assert head.num_classes == classes and sum(head.in_channels) == 3674 + 2816
    assert (sd.timestep, sd.get('denoising_from')) == (50, None)
    # Only the ControlNet variant is denoised from 60, as the authors' commands do.
    assert [v.get('denoising_from') for v in sd.variants] == \
        [60 if 'controlnets' in v else None for v in sd.variants]
    assert (adm.type, adm.model, adm.taps, adm.steps, adm.input_scale) == (
        'ADMSource', f'checkpoints/ddpm/{checkpoint}', (5, 6, 7, 8, 12), (50, 150, 250), 1.0)
    # The 256x256 images as they are for ADM; SD1.5 upsamples them to 512 itself.
    assert cfg.image_size == (256, 256) and sd.input_scale == 2.0
    assert adm.get('architecture') is None and adm.share_noise and adm.noise_seed == 0
    assert cfg.train_dataloader.dataset.type == cfg.test_dataloader.dataset.type == dataset
    sd.update(model=tiny['sd_model'], loras={k: tiny['loras']['a'] for k in sd.loras},
              taps=sd.taps[:3] + ('up_blocks.3.attentions.1', ))
    sd.controlnets.canny.model = tiny['controlnet']
    from mmseg_gate.testing.architectures import TINY_ADM
    adm.update(model=tiny['adm'], architecture=TINY_ADM)
    head.in_channels = [32, 64, 64, 32, 154, 64, 64, 64, 64, 64]  # as the demo config's
    model = MODELS.build(cfg.model)
    assert model.backbone.out_channels == head.in_channels
    assert DATASETS.get(dataset) is not None
    # One image: only the ControlNet variant runs the denoising (t = 60 -> 50 by DDPM's
    # 1,000-step schedule: 10 guided passes, each with its ControlNet pass).
    source = model.backbone.source.sources['sd']
    with torch.no_grad():
        source(torch.zeros(1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert source.counts['denoising_passes'] == 10
    assert source.counts['controlnet_passes'] == 11  # 10 denoising steps + the feature pass
    assert source.counts['unet_passes'] == len(sd.variants)
    assert cfg.test_evaluator[0].type == 'BenchmarkIoUMetric'
    assert cfg.fixed_split == dict(num_train=30, num_test=30) if name == 'horse21' else \
        dict(num_train=40, num_test=20)


def test_the_adm_source_can_be_left_out(tiny):
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'label_scarce', 'gate_pixel_demo.py'))
    sources = cfg.model.backbone.source.sources
    sources.sd.update(model=tiny['sd_model'], loras=dict(a=tiny['loras']['a']))
    sources.sd.controlnets.canny.model = tiny['controlnet']
    sources.adm = None
    from mmseg_gate.sources import build_source
    source = build_source(cfg.model.backbone.source)
    assert list(source.sources) == ['sd'] and source.num_variants == 3


def test_bilinear_reads_equal_resizing_the_whole_map():
    from mmseg_gate.store.reader import bilinear_at
    maps = torch.randn(3, 4, 5, 7)
    for size in ((16, 16), (5, 7), (3, 4)):
        images = torch.randint(0, 3, (40, ))
        ys, xs = torch.randint(0, size[0], (40, )), torch.randint(0, size[1], (40, ))
        whole = F.interpolate(maps, size=size, mode='bilinear', align_corners=False)
        torch.testing.assert_close(bilinear_at(maps, images, ys, xs, size),
                                   whole[images, :, ys, xs], rtol=1e-5, atol=1e-5)


def test_per_pixel_amalgamation_in_every_member():
    """The authors' member: one assigner shared by the buckets, softmax over them per
    channel; each member's loss reaches its own assigner only."""
    from mmseg_gate.models.pixel_ensemble import PixelAmalgamation, PixelMember
    amalgamation = PixelAmalgamation(6).eval()
    x = torch.randn(5, 3, 6)
    out = amalgamation(x)
    torch.testing.assert_close(amalgamation.weights.sum(dim=1), torch.ones(5, 6))
    torch.testing.assert_close(out, (amalgamation.weights * x).sum(dim=1))
    members = [PixelMember([(3, 6), (2, 4)], num_classes=4) for _ in range(2)]
    groups = [torch.randn(8, 3, 6), torch.randn(8, 2, 4)]
    loss = F.cross_entropy(members[0](groups), torch.randint(0, 4, (8, )))
    (loss - 0.1 * members[0].sparsity()).backward()
    for amalgamation in members[0].amalgamations:
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for p in amalgamation.assigner.parameters() if p.requires_grad)
    assert all(p.grad is None for p in members[1].parameters())
    assert 1 / 3**0.5 - 1e-6 <= members[0].sparsity().item() <= 1


def test_assigner_batch_norm_is_per_bucket_as_the_authors():
    """Their forward calls the assigner once per bucket: in training each bucket is
    normalised with its own batch statistics and the running statistics move once per
    bucket. Written out by hand: the assigner's layers on each bucket alone."""
    from mmseg_gate.models.pixel_ensemble import PixelAmalgamation
    torch.manual_seed(0)
    amalgamation = PixelAmalgamation(6, hidden=8, dropout=0.0).train()
    linear1, _, norm, _, linear2 = amalgamation.assigner
    x = torch.randn(16, 3, 6)
    x[:, 1] = x[:, 1] * 5 + 3  # a bucket on another scale: shared statistics would differ
    amalgamation(x)
    scores = []
    running_mean = torch.zeros(8)
    for b in range(3):
        h = linear1(x[:, b]).relu()
        mean, var = h.mean(0), h.var(0, unbiased=False)
        scores.append(linear2((h - mean) / (var + norm.eps).sqrt() * norm.weight + norm.bias))
        running_mean = 0.9 * running_mean + 0.1 * mean
    weights = torch.stack(scores, dim=1).softmax(dim=1)
    torch.testing.assert_close(amalgamation.weights, weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_mean, running_mean.detach(), rtol=1e-5, atol=1e-6)
    assert norm.num_batches_tracked.item() == 3


def test_sparsity_lambda_walks_as_the_authors():
    from mmseg_gate.models.amalgamation import SparsityWalk
    walk = SparsityWalk(np.random.default_rng(0))
    values = []
    for iteration in range(400):
        before = walk.value
        walk.update(iteration, loss=1.0 / (iteration + 1))
        if (iteration + 1) % 5:
            assert walk.value == before  # only every 5 iterations
        values.append(walk.value)
    assert values[0] == 0.0 and min(values) >= 0.0 and max(values) > 0
    assert all(abs(v / 1e-5 - round(v / 1e-5)) < 1e-6 for v in values)


def test_vote_takes_the_majority_and_the_lowest_on_ties():
    from mmseg_gate.protocols.pixel_training import predict

    class Fixed(torch.nn.Module):
        def __init__(self, labels):
            super().__init__()
            self.labels = torch.tensor(labels)
            self.classifier = torch.nn.Sequential(torch.nn.Linear(1, 3))

        def forward(self, groups):
            return F.one_hot(self.labels, 3).float()

    class Bank:
        size = (1, 2)

        def features(self, images, ys, xs):
            return [torch.zeros(len(ys), 1, 1)]
    members = [Fixed([2, 1]), Fixed([2, 0]), Fixed([1, 2])]
    assert predict(members, Bank(), 0).tolist() == [[2, 0]]  # 2 wins; 1/0/2 tie -> 0


class _Maps:
    """A store's reading surface over given maps: variants named as a composite names them."""

    folder = 'maps'

    def __init__(self, maps):
        self.maps = maps  # {variant name: {feature: (N, C, h, w)}}
        self.variant_names = list(maps)

    def names(self, variant):
        return list(self.maps[self.variant_names[variant]])

    def feature(self, index, variant, name):
        return self.maps[self.variant_names[variant]][name][index]


def test_nearest_first_reads_the_authors_extraction_grid():
    """SD maps nearest to the variant's largest map, then bilinear (the authors'
    extract_feature.py + task-pixel.py); the ADM part stays bilinear from its native maps."""
    from mmseg_gate.protocols.pixel_training import PixelBank
    torch.manual_seed(0)
    sd = {'coarse': torch.randn(2, 3, 4, 4), 'fine': torch.randn(2, 2, 16, 16)}
    adm = {'block': torch.randn(2, 2, 4, 4), 'other': torch.randn(2, 1, 8, 8)}
    store = _Maps({'sd: plain': sd, 'adm: t=50': adm})
    labels = [torch.zeros(32, 32), torch.zeros(32, 32)]
    images = torch.tensor([0, 1, 1, 0, 1])
    ys, xs = torch.tensor([0, 5, 17, 31, 9]), torch.tensor([3, 30, 2, 14, 21])

    def bilinear(maps, size=(32, 32)):
        return F.interpolate(maps, size=size, mode='bilinear', align_corners=False)

    def nearest(maps):
        return F.interpolate(maps, size=(16, 16), mode='nearest')
    theirs = PixelBank(store, [0, 1], labels, 255, 0, nearest_first=('sd', ))
    sd_ref = torch.cat([bilinear(nearest(sd['coarse'])), bilinear(sd['fine'])], dim=1)
    adm_ref = torch.cat([bilinear(adm['block']), bilinear(adm['other'])], dim=1)
    sd_out, adm_out = theirs.features(images, ys, xs)
    torch.testing.assert_close(sd_out[:, 0], sd_ref[images, :, ys, xs], rtol=0, atol=2e-3)
    torch.testing.assert_close(adm_out[:, 0], adm_ref[images, :, ys, xs], rtol=0, atol=2e-3)
    ours = PixelBank(store, [0, 1], labels, 255, 0, nearest_first=())
    plain = torch.cat([bilinear(sd['coarse']), bilinear(sd['fine'])], dim=1)
    torch.testing.assert_close(ours.features(images, ys, xs)[0][:, 0],
                               plain[images, :, ys, xs], rtol=0, atol=2e-3)
    assert not torch.allclose(sd_out[:, 0, :3], plain[images, :3, ys, xs], atol=1e-2)
    with pytest.raises(ValueError, match=r"names \['vae'\].*its parts: \['adm', 'sd'\]"):
        PixelBank(store, [0, 1], labels, 255, 0, nearest_first=('sd', 'vae'))


def test_nearest_then_bilinear_reads_equal_resizing_twice():
    from mmseg_gate.store.reader import bilinear_at
    torch.manual_seed(0)
    for native, grid, size in (((16, 16), (64, 64), (256, 256)), ((5, 7), (12, 9), (31, 17)),
                               ((7, 3), (64, 64), (50, 50))):
        maps = torch.randn(3, 4, *native)
        images = torch.randint(0, 3, (300, ))
        ys, xs = torch.randint(0, size[0], (300, )), torch.randint(0, size[1], (300, ))
        twice = F.interpolate(F.interpolate(maps, size=grid, mode='nearest'), size=size,
                              mode='bilinear', align_corners=False)
        torch.testing.assert_close(bilinear_at(maps, images, ys, xs, size, via=grid),
                                   twice[images, :, ys, xs], rtol=1e-5, atol=1e-5)
