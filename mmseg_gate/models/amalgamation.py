"""Trainable layers on top of the frozen diffusion features: fusion of GATE's variants, then
refinement.

``VariantAmalgamation`` is the paper's learned amalgamation: per level, a weight assigner gives
each variant a per-image, per-channel weight, softmaxed across variants.

``amalgamation_sparsity`` and ``amalgamation_diversity`` measure the assigners' weights for
the regulariser of the authors' label-scarce and correspondence code (see
``GATEEncoderDecoder``).

``ZeroInitResBlock`` is the paper's refinement block: a residual conv block that starts as the
identity, so training begins from the raw diffusion features. Only the last norm's scale is
zeroed (as in "zero-init residual" ResNets): the authors zero every weight of the block, which
leaves its convolutions without gradient forever.
"""
from typing import List, Optional, Tuple

import numpy as np
import torch
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule, Sequential, constant_init
from torch import nn


class ZeroInitResBlock(BaseModule):
    """x + norm(conv(relu(norm(conv(x))))), the identity at initialisation.

    Args:
        channels: input and output channels.
        norm_cfg: norm layer config, e.g. ``dict(type='SyncBN', requires_grad=True)``.
        init_cfg: MMEngine initialisation config for the convolutions.
    """

    def __init__(self, channels: int, norm_cfg: dict = dict(type='BN', requires_grad=True),
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg)
        self.conv1 = ConvModule(channels, channels, 3, padding=1, norm_cfg=norm_cfg,
                                act_cfg=dict(type='ReLU'))
        self.conv2 = ConvModule(channels, channels, 3, padding=1, norm_cfg=norm_cfg,
                                act_cfg=None)
        self.zero_last_norm()

    def zero_last_norm(self) -> None:
        constant_init(self.conv2.norm, val=0.0, bias=0.0)

    def init_weights(self) -> None:
        super().init_weights()
        self.zero_last_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


def refinement_stack(channels: int, num_blocks: int, norm_cfg: dict) -> nn.Module:
    """``num_blocks`` refinement blocks, each with its own weights (identity if 0)."""
    if num_blocks == 0:
        return nn.Identity()
    return Sequential(*[ZeroInitResBlock(channels, norm_cfg) for _ in range(num_blocks)])


class WeightAssigner(BaseModule):
    """Scores one variant's feature map: a per-image, per-channel logit.

    conv3x3 -> ``hidden_channels``, ReLU, BN, dropout, global average pool, linear -> C.
    ``conv_init``: 'kaiming' (mmcv's ``ConvModule`` initialisation, MMSeg's convention) or
    'pytorch' (``nn.Conv2d``'s own, the authors' plain convolution: weights about 13x
    smaller at 3,840 input channels, which changes AdamW's relative step).
    """

    def __init__(self, channels: int, hidden_channels: int = 128, dropout_ratio: float = 0.5,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 conv_init: str = 'kaiming', init_cfg: Optional[dict] = None):
        super().__init__(init_cfg)
        if conv_init not in ('kaiming', 'pytorch'):
            raise ValueError(f"conv_init must be 'kaiming' or 'pytorch', got {conv_init!r}.")
        self.conv_init = conv_init
        self.conv = ConvModule(channels, hidden_channels, 3, padding=1, bias=False,
                               norm_cfg=norm_cfg, act_cfg=dict(type='ReLU'),
                               order=('conv', 'act', 'norm'))
        self.dropout = nn.Dropout(dropout_ratio)
        self.fc = nn.Linear(hidden_channels, channels)
        self._apply_conv_init()  # ConvModule initialises itself (kaiming) when built

    def init_weights(self) -> None:
        super().init_weights()
        self._apply_conv_init()

    def _apply_conv_init(self) -> None:
        if self.conv_init == 'pytorch':
            self.conv.conv.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.dropout(self.conv(x)).mean(dim=(2, 3))
        return self.fc(pooled)


class VariantAmalgamation(BaseModule):
    """Fuses the features of GATE's variants with learned, input-dependent weights.

    Each assigner scores every variant (shared weights across variants); the scores are
    softmaxed across variants, per image and channel, and the variants summed with them.
    Several assigners give several such sums, concatenated along channels (the paper's
    appendix A.4). With one variant this is the identity.

    Args:
        channels: channels of each variant's feature map.
        num_variants: number of variants fused.
        num_assigners: number of weight assigners; output channels are
            ``channels * num_assigners`` (1 with a single variant).
        assigner_cfg: :class:`WeightAssigner`'s ``hidden_channels``, ``dropout_ratio`` and
            ``conv_init`` (its defaults for those not given).
        norm_cfg: of each assigner.
    """

    def __init__(self, channels: int, num_variants: int, num_assigners: int = 1,
                 assigner_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg)
        self.num_variants = num_variants
        if num_variants > 1:
            self.assigners = nn.ModuleList(
                WeightAssigner(channels, norm_cfg=norm_cfg, **(assigner_cfg or {}))
                for _ in range(num_assigners))
        self.out_channels = channels * (num_assigners if num_variants > 1 else 1)
        self.last_weights: Optional[torch.Tensor] = None
        self.weights_for_loss: Optional[torch.Tensor] = None

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        if len(feats) != self.num_variants:
            raise ValueError(f'expected {self.num_variants} variant features, got {len(feats)}')
        if self.num_variants == 1:
            return feats[0]
        stacked = torch.stack(feats)  # (V, B, C, H, W)
        fused, weights = [], []
        for assigner in self.assigners:
            w = torch.stack([assigner(f) for f in feats]).softmax(dim=0)  # (V, B, C)
            weights.append(w)
            fused.append((w[..., None, None] * stacked).sum(dim=0))
        weights = torch.stack(weights)  # (A, V, B, C)
        # For inspection (which variant the model relies on, per channel), and, in training,
        # with gradients for the amalgamation regulariser.
        self.last_weights = weights.detach()
        self.weights_for_loss = weights if self.training else None
        return torch.cat(fused, dim=1)


class GATEFusion(BaseModule):
    """GATE's trainable half: per feature level, the variants' maps amalgamated, then
    refined; levels ordered from high to low resolution (MMSeg's convention).

    Args:
        feature_info: a source's ``feature_info``: ``module``, ``num_chs``, ``reduction``
            and ``num_variants`` (the variants that hold it) per feature.
        num_assigners: weight assigners per level (see :class:`VariantAmalgamation`).
        assigner_cfg: of the assigners (:class:`VariantAmalgamation`).
        num_refine_blocks: refinement blocks per level.
        norm_cfg: norm layer of the assigners and refinement blocks.
    """

    def __init__(self, feature_info: List[dict], num_assigners: int = 1,
                 assigner_cfg: Optional[dict] = None,
                 num_refine_blocks: int = 1,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg)
        # High resolution first; a stable sort keeps the given order within a stride.
        levels = sorted(feature_info, key=lambda f: f['reduction'])
        self.names = [f['module'] for f in levels]
        self.strides = [f['reduction'] for f in levels]
        self.amalgamations = nn.ModuleList(
            VariantAmalgamation(f['num_chs'], f['num_variants'], num_assigners, assigner_cfg,
                                norm_cfg) for f in levels)
        self.out_channels = [a.out_channels for a in self.amalgamations]
        self.refiners = nn.ModuleList(
            refinement_stack(c, num_refine_blocks, norm_cfg) for c in self.out_channels)

    def forward(self, per_variant: List[dict],
                dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, ...]:
        """``per_variant``: one dict name -> (N, C, H, W) per variant (a level is fused over
        the variants that hold it); ``dtype``: the dtype to run in (the features' own by
        default)."""
        outs = []
        for level, name in enumerate(self.names):
            feats = [variant[name] if dtype is None else variant[name].to(dtype)
                     for variant in per_variant if name in variant]
            outs.append(self.refiners[level](self.amalgamations[level](feats)))
        return tuple(outs)


def amalgamation_sparsity(weights: torch.Tensor) -> torch.Tensor:
    """Mean over assigners, images and channels of the L2 norm across variants of the
    softmax weights (A, V, B, C): 1 when every channel takes one variant, 1/sqrt(V) when
    all are mixed evenly (the authors' sparsity, before they negate it)."""
    return weights.norm(dim=1).mean()


def sparsity_loss(sparsity: torch.Tensor, task_loss: torch.Tensor,
                  weight: float) -> torch.Tensor:
    """The authors' sparsity objective as a loss term: ``weight * L * (1 - s / s)`` with the
    task loss ``L`` and the second ``s`` detached -- 0 in value, gradient
    ``-weight * L / s * ds`` (theirs, ``weight * s * L.detach() / (-s.detach())``, has the same
    gradient and a value of ``-weight * L``, which would hide the task loss in the logs)."""
    return weight * task_loss.detach() * (1 - sparsity / sparsity.detach())


class SparsityWalk:
    """The authors' lambda of the sparsity term (label-scarce and correspondence alike): 0
    at first; every 5 iterations the loss drop since the last check is compared with the best
    drop so far (decaying by 0.9 per check); the current lambda is kept as the base when it
    did better (or, 1 time in 20, regardless), and the next lambda is the base plus -1e-5, 0
    or +1e-5, never below 0."""

    def __init__(self, rng: np.random.Generator, step: float = 1e-5):
        self.rng, self.step = rng, step
        self.value = self.base = self.best_drop = 0.0
        self.last_loss = None

    def update(self, iteration: int, loss: float) -> None:
        if (iteration + 1) % 5:
            return
        drop = 0.0 if self.last_loss is None else self.last_loss - loss
        self.last_loss = loss
        if self.rng.integers(20) == 0 or drop > self.best_drop:
            self.base, self.best_drop = self.value, drop
        self.best_drop *= 0.9
        self.value = max(0.0, self.base + self.step * int(self.rng.integers(-1, 2)))


def amalgamation_diversity(weights: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between the weightings (V x C per image) of every pair of
    assigners: 1 when the concatenated fusions are copies of each other. The authors declare
    a diversity term but never compute it; this is our definition. 0 with one assigner."""
    num = weights.shape[0]
    if num < 2:
        return weights.new_zeros(())
    flat = weights.permute(2, 0, 1, 3).flatten(2)  # (B, A, V * C)
    flat = torch.nn.functional.normalize(flat, dim=-1)
    similarity = flat @ flat.transpose(1, 2)  # (B, A, A)
    pairs = ~torch.eye(num, dtype=torch.bool, device=weights.device)
    return similarity[:, pairs].mean()
