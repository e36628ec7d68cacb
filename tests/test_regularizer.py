"""GATE's amalgamation regulariser: the measures, and the segmentor that adds it."""
import math

import pytest
import torch

from mmseg.registry import MODELS, RUNNERS
from mmseg_gate.models.amalgamation import amalgamation_diversity, amalgamation_sparsity


def test_sparsity_measure():
    one_hot = torch.zeros(1, 3, 2, 4)
    one_hot[0, 1] = 1
    assert amalgamation_sparsity(one_hot).item() == pytest.approx(1.0)
    uniform = torch.full((2, 3, 2, 4), 1 / 3)
    assert amalgamation_sparsity(uniform).item() == pytest.approx(1 / math.sqrt(3))


def test_diversity_measure():
    weights = torch.rand(1, 3, 2, 4).softmax(dim=1)
    assert amalgamation_diversity(weights).item() == 0  # one assigner
    assert amalgamation_diversity(weights.repeat(2, 1, 1, 1)).item() == pytest.approx(1.0)
    a, b = torch.zeros(3, 2, 4), torch.zeros(3, 2, 4)
    a[0], b[1] = 1, 1  # disjoint choices: orthogonal
    assert amalgamation_diversity(torch.stack([a, b])).item() == pytest.approx(0.0)


def test_off_by_default_and_unknown_keys(make_demo_cfg, tmp_path):
    cfg = make_demo_cfg(tmp_path, 1)
    cfg.model.type = 'GATEEncoderDecoder'
    model = MODELS.build(cfg.model)
    assert model.sparsity_weight == 0 and model.diversity_weight == 0
    cfg.model.amalgamation_regularizer = dict(sparsity=0.1, typo=1)
    with pytest.raises(KeyError, match='typo'):
        MODELS.build(cfg.model)


def test_sparsity_term_makes_channels_choose(make_demo_cfg, tmp_path):
    """The term's value is 0 (the logged total stays the task loss) and a gradient step on it
    makes the assigners' weights sparser."""
    cfg = make_demo_cfg(tmp_path, 1)
    cfg.model.type = 'GATEEncoderDecoder'
    cfg.model.amalgamation_regularizer = dict(sparsity=1.0, diversity=1.0)
    cfg.model.backbone.num_assigners = 2
    cfg.model.backbone.assigner_cfg = dict(hidden_channels=128, dropout_ratio=0.0)
    cfg.model.decode_head.in_channels = [128, 128, 128]
    cfg.model.auxiliary_head.in_channels = 128
    model = MODELS.build(cfg.model).train()
    inputs = torch.rand(2, 3, 64, 64) * 2 - 1
    from mmseg.structures import SegDataSample
    from mmengine.structures import PixelData
    samples = [SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, 5, (1, 64, 64))),
                             metainfo=dict(img_shape=(64, 64), pad_shape=(64, 64)))
               for _ in range(2)]

    def loss():
        model.backbone._train_generator = None  # the same noise every call
        return model.loss(inputs, samples)

    losses = loss()
    for key in ('loss_amalgamation_sparsity', 'loss_amalgamation_diversity'):
        assert losses[key].item() == pytest.approx(0.0, abs=1e-6)
    before = losses['amalgamation_sparsity'].item()
    assert 1 / math.sqrt(3) - 1e-4 <= before <= 1
    params = [p for n, p in model.named_parameters() if 'assigners' in n]
    optimizer = torch.optim.SGD(params, lr=1.0)
    for _ in range(3):
        losses = loss()
        optimizer.zero_grad()
        losses['loss_amalgamation_sparsity'].backward()
        optimizer.step()
    after = loss()['amalgamation_sparsity'].item()
    assert after > before


def test_trains_in_a_config(make_demo_cfg, tmp_path):
    cfg = make_demo_cfg(tmp_path, 2)
    cfg.model.type = 'GATEEncoderDecoder'
    cfg.model.amalgamation_regularizer = dict(sparsity=0.1)
    runner = RUNNERS.build(cfg)
    runner.train()
    assert runner.message_hub.get_scalar('train/amalgamation_sparsity') is not None


def test_assigner_convolution_initialisation():
    """'kaiming': mmcv's (std sqrt(2 / fan_out)); 'pytorch': nn.Conv2d's own, the authors'
    (uniform, std 1 / sqrt(3 fan_in)), kept through init_weights."""
    from mmseg_gate.models.amalgamation import WeightAssigner
    channels, hidden = 256, 128
    torch.manual_seed(0)
    for conv_init, std in (('kaiming', (2 / (hidden * 9)) ** 0.5),
                           ('pytorch', 1 / (3 * channels * 9) ** 0.5)):
        assigner = WeightAssigner(channels, hidden, conv_init=conv_init)
        for _ in range(2):  # as built, then after MMEngine's init_weights
            assert assigner.conv.conv.weight.std().item() == pytest.approx(std, rel=0.05)
            assigner.init_weights()
    with pytest.raises(ValueError, match='conv_init'):
        WeightAssigner(8, conv_init='xavier')
