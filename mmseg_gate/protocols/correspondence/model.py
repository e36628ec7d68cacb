"""The trained aggregation network and its checkpoints (plain tensors, loaded completely).
"""
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from safetensors.torch import load_file, save_file

from ...fileio import atomic_file
from ...models.amalgamation import VariantAmalgamation, amalgamation_sparsity
from .features import Features


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


class CorrespondenceAggregator(BaseModule):
    """GATE's amalgamation per level, DHF's bottleneck per level and learned level mixing.

    Args:
        feature_info: the source's ``feature_info`` (``module``, ``num_chs``,
            ``num_variants`` per level).
        projection_dim: channels of the output (DHF: 384).
        num_assigners, hidden_channels, dropout_ratio: of each level's amalgamation.
    """

    def __init__(self, feature_info: List[dict], projection_dim: int = 384,
                 num_assigners: int = 1, hidden_channels: int = 128,
                 dropout_ratio: float = 0.5):
        super().__init__()
        self.names = [info['module'] for info in feature_info]
        self.amalgamations = nn.ModuleList(
            VariantAmalgamation(info['num_chs'], info['num_variants'], num_assigners,
                                hidden_channels, dropout_ratio) for info in feature_info)
        self.bottlenecks = nn.ModuleList(
            Bottleneck(a.out_channels, projection_dim) for a in self.amalgamations)
        self.mixing_weights = nn.Parameter(torch.ones(len(feature_info)))

    def forward(self, feats: Features) -> torch.Tensor:
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
