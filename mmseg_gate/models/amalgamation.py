"""Trainable layers on top of the frozen diffusion features.

``ZeroInitResBlock`` is the paper's refinement block: a residual conv block that starts as the
identity, so training begins from the raw diffusion features. Only the last norm's scale is
zeroed (as in "zero-init residual" ResNets): the authors zero every weight of the block, which
leaves its convolutions without gradient forever.
"""
from typing import Optional

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
