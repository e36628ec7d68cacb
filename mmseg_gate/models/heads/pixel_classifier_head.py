"""DDPM-segmentation's pixel classifier as an MMSeg decode head.

The label-scarce benchmark classifies every pixel from its feature vector alone: the feature
maps are resized to one resolution (256x256 in the benchmark) and concatenated, and an ensemble
of small MLPs (``C -> 128 -> 32 -> classes`` with ReLU and BatchNorm; ``256 -> 128`` for 30
classes or more) labels each pixel; the ensemble's prediction is the majority vote of its
members' argmax. Here the members are 1x1 convolutions, grouped so that the K members run as
one set of layers while each keeps its own weights and its own BatchNorm statistics (exactly K
independent MLPs), and each member gets its own loss.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS


@MODELS.register_module()
class PixelClassifierHead(BaseDecodeHead):
    """An ensemble of per-pixel MLPs on multi-level features (DDPM-segmentation's head).

    Args:
        in_channels (Sequence[int]): channels of the levels in ``in_index``.
        num_classes (int): number of classes.
        in_index (Sequence[int]): the backbone levels to use. Default: all given.
        feature_size (int | tuple, optional): every level is resized (bilinear) to this
            (H, W) before the MLPs, e.g. 256 as in the benchmark; None: the size of the
            first (finest) level. Logits are then resized to the label by MMSeg as usual.
        num_classifiers (int): ensemble members. Default: 10 (the benchmark's).
        hidden_channels (Sequence[int], optional): the MLP's hidden widths. Default: the
            benchmark's, (128, 32) below 30 classes, (256, 128) from 30 on.
        ensemble (str): 'vote' (majority of the members' argmax, the benchmark's) or
            'mean' (mean of their softmax). The result is returned as class scores.
        predict_at_label_size (bool): at test time, return the scores at the image's
            original size (the labels' resolution) -- unchanged when ``feature_size`` is that
            size -- instead of MMSeg's resize to the model input and back, a bilinear round
            trip that blurs the vote before its argmax. Padded inputs fall back to MMSeg's
            way. Default: True.
        init_cfg (dict, optional): None: the benchmark's initialisation (``init_weights``).
        **kwargs: ``BaseDecodeHead``'s (``loss_decode``, ``ignore_index``, ...).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int,
                 in_index: Optional[Sequence[int]] = None,
                 feature_size: Union[int, Tuple[int, int], None] = 256,
                 num_classifiers: int = 10,
                 hidden_channels: Optional[Sequence[int]] = None,
                 ensemble: str = 'vote', predict_at_label_size: bool = True,
                 init_cfg: Optional[dict] = None, **kwargs):
        if ensemble not in ('vote', 'mean'):
            raise ValueError(f"ensemble must be 'vote' or 'mean', got {ensemble!r}.")
        hidden = list(hidden_channels or ((128, 32) if num_classes < 30 else (256, 128)))
        in_channels = list(in_channels)
        super().__init__(in_channels=in_channels, channels=hidden[-1], num_classes=num_classes,
                         in_index=list(in_index if in_index is not None
                                       else range(len(in_channels))),
                         input_transform='multiple_select', init_cfg=init_cfg, **kwargs)
        del self.conv_seg  # the members have their own output layers
        self.feature_size = (feature_size, feature_size) if isinstance(feature_size, int) \
            else feature_size
        self.num_classifiers, self.ensemble = num_classifiers, ensemble
        self.predict_at_label_size = predict_at_label_size
        layers, width, groups = [], sum(in_channels), 1
        for out in hidden:
            layers += [nn.Conv2d(width, out * num_classifiers, 1, groups=groups),
                       nn.ReLU(inplace=True), nn.BatchNorm2d(out * num_classifiers)]
            width, groups = out * num_classifiers, num_classifiers
        layers.append(nn.Conv2d(width, num_classes * num_classifiers, 1, groups=groups))
        self.members = nn.Sequential(*layers)

    def init_weights(self) -> None:
        """The benchmark's initialisation: N(0, 0.02) weights, zero biases."""
        super().init_weights()
        for module in self.members.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def pixel_features(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        """The selected levels resized to ``feature_size`` and concatenated."""
        feats = self._transform_inputs(inputs)
        size = self.feature_size or feats[0].shape[2:]
        return torch.cat([f if f.shape[2:] == tuple(size) else
                          F.interpolate(f, size=size, mode='bilinear',
                                        align_corners=self.align_corners)
                          for f in feats], dim=1)

    def member_logits(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        """(N, K, classes, H, W): every member's logits."""
        logits = self.members(self.pixel_features(inputs))
        n, _, h, w = logits.shape
        return logits.view(n, self.num_classifiers, self.num_classes, h, w)

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        """The ensemble's class scores: vote fractions, or the mean softmax."""
        logits = self.member_logits(inputs)
        if self.ensemble == 'mean':
            return logits.softmax(dim=2).mean(dim=1)
        votes = F.one_hot(logits.argmax(dim=2), self.num_classes)  # (N, K, H, W, classes)
        return votes.float().mean(dim=1).permute(0, 3, 1, 2)

    def predict_by_feat(self, seg_logits: torch.Tensor, batch_img_metas: List[dict]):
        """The scores at the labels' size (``predict_at_label_size``): the segmentor's
        resize to ``ori_shape`` is then the identity, and the argmax sees the vote itself."""
        padded = any(any(meta.get('padding_size', [0] * 4)) for meta in batch_img_metas)
        if not self.predict_at_label_size or padded:
            return super().predict_by_feat(seg_logits, batch_img_metas)
        size = tuple(batch_img_metas[0]['ori_shape'][:2])
        if tuple(seg_logits.shape[2:]) == size:
            return seg_logits
        return F.interpolate(seg_logits, size=size, mode='bilinear',
                             align_corners=self.align_corners)

    def loss(self, inputs, batch_data_samples, train_cfg) -> dict:
        """Each member learns on its own logits; the losses and accuracies are averaged."""
        logits = self.member_logits(inputs)
        per_member = [self.loss_by_feat(logits[:, k], batch_data_samples)
                      for k in range(self.num_classifiers)]
        return {key: torch.stack([m[key] for m in per_member]).mean()
                for key in per_member[0]}
