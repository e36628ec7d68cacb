"""The GATE authors' label-scarce classifier: a per-pixel amalgamation inside every member.

In ``scarce_segmentation_gate`` each of the 10 ensemble members amalgamates the variants of
one pixel's feature itself: one assigner, ``Linear(C, 128) - ReLU - BN1d - Dropout -
Linear(128, C)``, is applied to every variant's (``bucket``'s) C-vector, the outputs are
softmaxed over the variants per channel and the variants summed with those weights; a second
source (ADM's features, its timesteps as the buckets) gets its own assigner; the sums are
concatenated and classified by DDPM-segmentation's MLP. Each member is trained on its own,
with its own sparsity term (see ``protocols/pixel_training.py``).
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from .amalgamation import amalgamation_sparsity


class PixelAmalgamation(nn.Module):
    """One assigner shared by the buckets of a feature group: (B, V, C) -> (B, C); the last
    softmax weights (B, V, C) stay in ``weights`` for the sparsity term. As the authors'
    ``pixel_classifier.forward``, the assigner is called once per bucket: in training its
    BatchNorm normalises each bucket with that bucket's own batch statistics, and its running
    statistics take one update per bucket per step."""

    def __init__(self, channels: int, hidden: int = 128, dropout: float = 0.5):
        super().__init__()
        self.assigner = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(),
                                      nn.BatchNorm1d(hidden), nn.Dropout(dropout),
                                      nn.Linear(hidden, channels))
        self.weights = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.stack([self.assigner(x[:, b]) for b in range(x.shape[1])], dim=1)
        self.weights = scores.softmax(dim=1)
        return (self.weights * x).sum(dim=1)


class PixelMember(nn.Module):
    """One ensemble member: an amalgamation per feature group, then the benchmark's MLP.

    Args:
        groups (Sequence[Tuple[int, int]]): (buckets, channels) of each feature group, e.g.
            ``[(4, 3674)]`` for four SD variants, ``[(4, 3674), (3, 2816)]`` with ADM.
        num_classes (int): classes.
        hidden_channels (Sequence[int], optional): the MLP's widths; the benchmark's by
            default, (128, 32) below 30 classes, (256, 128) from 30 on.
        assigner_hidden (int): the assigners' hidden width. Default: 128.
        dropout (float): the assigners' dropout. Default: 0.5 (``nn.Dropout()``).
    """

    def __init__(self, groups: Sequence[Tuple[int, int]], num_classes: int,
                 hidden_channels: Sequence[int] = None, assigner_hidden: int = 128,
                 dropout: float = 0.5):
        super().__init__()
        self.groups = [tuple(g) for g in groups]
        self.amalgamations = nn.ModuleList(
            [PixelAmalgamation(channels, assigner_hidden, dropout)
             for _, channels in self.groups])
        widths = list(hidden_channels or ((128, 32) if num_classes < 30 else (256, 128)))
        layers, width = [], sum(channels for _, channels in self.groups)
        for out in widths:
            layers += [nn.Linear(width, out), nn.ReLU(), nn.BatchNorm1d(out)]
            width = out
        layers.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*layers)
        self.init_weights()

    def init_weights(self) -> None:
        """The benchmark's initialisation: N(0, 0.02) linear weights, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, groups: List[torch.Tensor]) -> torch.Tensor:
        """Per group (B, buckets, channels) -> logits (B, classes)."""
        return self.classifier(torch.cat(
            [amalgamation(x) for amalgamation, x in zip(self.amalgamations, groups)], dim=1))

    def sparsity(self) -> torch.Tensor:
        """The authors' measure over this member's last weights: the mean over its
        amalgamations of the L2 norm across buckets, before they negate it."""
        return torch.stack([amalgamation_sparsity(a.weights.transpose(0, 1)[None])
                            for a in self.amalgamations]).mean()  # (1, V, B, C)
