"""The trained aggregation networks and their checkpoints (plain tensors, loaded
completely): the GATE authors' ``GATEAggregationNetwork`` and the Diffusion-Hyperfeatures-style
``CorrespondenceAggregator``, both registered in MMSeg's ``MODELS``.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from safetensors.torch import load_file, save_file

from ..fileio import atomic_file
from ..sources.base import SourceOutput
from .amalgamation import VariantAmalgamation, amalgamation_sparsity


class Bottleneck(nn.Module):
    """Diffusion Hyperfeatures' projection of one level: a ResNet bottleneck block with
    GroupNorm and a projected shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = max(out_channels // 4, 1)

        def norm(c):
            return nn.GroupNorm(32 if c % 32 == 0 else 1, c)

        self.body = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, bias=False), norm(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), norm(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 1, bias=False), norm(out_channels))
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def refuse_renamed(name: str, given: dict) -> None:
    """The assigner's settings moved into ``assigner_cfg``: name the new key."""
    if given:
        raise TypeError(f'{name} got {sorted(given)}: the weight assigner\'s settings '
                        '(hidden_channels, dropout_ratio, conv_init) now go in '
                        f'assigner_cfg=dict(...), e.g. assigner_cfg={dict(given)}.')


@MODELS.register_module()
class CorrespondenceAggregator(BaseModule):
    """GATE's amalgamation per level, DHF's bottleneck per level and learned level mixing.

    Args:
        feature_info: the source's ``feature_info`` (``module``, ``num_chs``,
            ``num_variants`` per level).
        projection_dim: channels of the output (DHF: 384).
        num_assigners, assigner_cfg: of each level's amalgamation
            (:class:`VariantAmalgamation`).
    """

    def __init__(self, feature_info: List[dict], projection_dim: int = 384,
                 num_assigners: int = 1, assigner_cfg: Optional[dict] = None, **renamed):
        refuse_renamed(type(self).__name__, renamed)
        super().__init__()
        self.names = [info['module'] for info in feature_info]
        self.amalgamations = nn.ModuleList(
            VariantAmalgamation(info['num_chs'], info['num_variants'], num_assigners,
                                assigner_cfg) for info in feature_info)
        self.bottlenecks = nn.ModuleList(
            Bottleneck(a.out_channels, projection_dim) for a in self.amalgamations)
        self.mixing_weights = nn.Parameter(torch.ones(len(feature_info)))

    def forward(self, feats: SourceOutput) -> torch.Tensor:
        """(N, projection_dim, h, w) at the finest level's resolution."""
        levels = [bottleneck(amalgamation([variant[name] for variant in feats
                                           if name in variant]))
                  for name, amalgamation, bottleneck in zip(self.names, self.amalgamations,
                                                             self.bottlenecks)]
        size = max((level.shape[2:] for level in levels), key=lambda s: s[0] * s[1])
        weights = self.mixing_weights.softmax(dim=0)
        return sum(w * F.interpolate(level, size=size, mode='bilinear', align_corners=False)
                   for w, level in zip(weights, levels))

    def sparsity(self) -> torch.Tensor:
        """The amalgamation's sparsity measure over the last training forward's weights."""
        weights = [a.weights_for_loss for a in self.amalgamations
                   if a.weights_for_loss is not None]
        return torch.stack([amalgamation_sparsity(w) for w in weights]).mean() if weights \
            else torch.zeros(())


OUTPUTS = ('conv', 'nn')


@MODELS.register_module()
class GATEAggregationNetwork(BaseModule):
    """The GATE authors' correspondence aggregator (``correspondence_gate``'s
    ``AggregationNetwork``, settings "conv" and "nn").

    Every variant's features, each resized to ``grid`` (nearest, as their extraction
    aggregates the levels) and concatenated (SD1.5's four taps: 3,520 channels), go through
    one amalgamation over the variants (their weight assigner: conv3x3 -> 128, ReLU, BN,
    dropout, global pool, linear -> a weight per channel, softmax over the variants). The
    ``bypass`` features -- their separate run's cross-attention maps, 154 channels -- are
    concatenated to the weighted sum unweighted; "conv" then applies a 3x3 convolution
    (3,674 -> 3,674, no bias), "nn" nothing.

    Args:
        feature_info: the source's ``feature_info``.
        bypass (Sequence[str]): features concatenated after the amalgamation, each held by
            one variant. Default: ('attn.cross_attention_maps', ), the attention source of
            ``configs/correspondence/gate_spair.py``.
        output (str): 'conv' or 'nn'. Default: 'conv'.
        grid (int): side of the output grid (64 for their 512x512 inputs). Default: 64.
        resize_mode (str): how levels are resized to the grid. Default: 'nearest'.
        assigner_cfg (dict, optional): the weight assigner's ``hidden_channels``,
            ``dropout_ratio`` and ``conv_init`` ('kaiming', mmcv's, or 'pytorch', the authors'
            plain ``nn.Conv2d``); :class:`WeightAssigner`'s defaults for those not given.
    """

    def __init__(self, feature_info: List[dict],
                 bypass: Sequence[str] = ('attn.cross_attention_maps', ),
                 output: str = 'conv', grid: int = 64, resize_mode: str = 'nearest',
                 assigner_cfg: Optional[dict] = None, **renamed):
        refuse_renamed(type(self).__name__, renamed)
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f'GATEAggregationNetwork output must be one of {OUTPUTS}, got '
                             f'{output!r}.')
        names = [info['module'] for info in feature_info]
        unknown = [b for b in bypass if b not in names]
        if unknown:
            raise ValueError(f'GATEAggregationNetwork bypass {unknown} are not features of the '
                             f'source ({names}).')
        self.bypass = list(bypass)
        fused = [info for info in feature_info if info['module'] not in self.bypass]
        held = [(info['module'], info['num_variants']) for info in fused]
        if not fused or len({count for _, count in held}) != 1:
            raise ValueError('GATEAggregationNetwork amalgamates features that every variant '
                             f'of one group holds; got (feature, variants) {held}.')
        self.fused = [info['module'] for info in fused]
        channels = sum(info['num_chs'] for info in fused)
        self.amalgamation = VariantAmalgamation(channels, fused[0]['num_variants'], 1,
                                                assigner_cfg)
        width = channels + sum(info['num_chs'] for info in feature_info
                               if info['module'] in self.bypass)
        self.output = output
        self.out_conv = nn.Conv2d(width, width, 3, padding=1, bias=False) \
            if output == 'conv' else nn.Identity()
        self.grid, self.resize_mode, self.out_channels = (grid, grid), resize_mode, width

    def _resized(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.grid:
            return x.float()
        return F.interpolate(x.float(), size=self.grid, mode=self.resize_mode)

    def forward(self, feats: SourceOutput) -> torch.Tensor:
        """(N, out_channels, grid, grid)."""
        variants = [torch.cat([self._resized(v[name]) for name in self.fused], dim=1)
                    for v in feats if self.fused[0] in v]
        extra = []
        for name in self.bypass:
            held = [v[name] for v in feats if name in v]
            if len(held) != 1:
                raise ValueError(f"GATEAggregationNetwork: bypass feature '{name}' is held by "
                                 f'{len(held)} variants; it must come from one (a source of '
                                 'its own).')
            extra.append(self._resized(held[0]))
        return self.out_conv(torch.cat([self.amalgamation(variants), *extra], dim=1))

    def sparsity(self) -> torch.Tensor:
        """The amalgamation's sparsity measure over the last training forward's weights."""
        weights = self.amalgamation.weights_for_loss
        return amalgamation_sparsity(weights) if weights is not None else torch.zeros(())


def build_aggregator(cfg: dict, feature_info: List[dict]) -> nn.Module:
    """An aggregator from the config's ``aggregator`` (``type`` defaults to
    ``'CorrespondenceAggregator'``)."""
    cfg = dict(cfg)
    cfg.setdefault('type', 'CorrespondenceAggregator')
    return MODELS.build(dict(cfg, feature_info=feature_info))


def save_aggregator(aggregator: nn.Module, path: str) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous()
                   for k, v in aggregator.state_dict().items()}, tmp)


def load_aggregator(aggregator: nn.Module, path: str) -> None:
    """Load a saved aggregator completely (every tensor, matching shapes) or fail."""
    try:
        state = load_file(path)
        aggregator.load_state_dict(state, strict=True)
    except Exception as err:  # missing file, not safetensors, other keys or shapes
        raise ValueError(f"Cannot load the aggregation network from '{path}' ({err}). It must "
                         'be a checkpoint `tools/correspondence.py train` wrote for this '
                         'config.') from err
