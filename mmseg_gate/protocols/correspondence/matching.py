"""Keypoints on feature grids, the training loss over keypoint pairs, and matching.
"""
from typing import Tuple

import torch
import torch.nn.functional as F


def to_grid(kps: torch.Tensor, image_size: Tuple[int, int], grid: Tuple[int, int]
            ) -> torch.Tensor:
    """[x, y] in pixels of a (W, H) image -> [x, y] on an (h, w) grid (pixel centres).
    SPair's keypoints are integers: computed in float."""
    kps = kps.float()
    scale = kps.new_tensor([grid[1] / image_size[0], grid[0] / image_size[1]])
    return (kps + 0.5) * scale - 0.5


def keypoint_loss(source: torch.Tensor, target: torch.Tensor, src_kps: torch.Tensor,
                  trg_kps: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric contrastive loss of matching keypoints: each source keypoint's feature must
    pick its target position among all target positions, and vice versa. ``source`` and
    ``target`` are (C, h, w); keypoints are on that grid."""
    _, h, w = source.shape

    def index(kps):
        x = kps[:, 0].round().clamp(0, w - 1).long()
        y = kps[:, 1].round().clamp(0, h - 1).long()
        return y * w + x

    a = F.normalize(source.flatten(1), dim=0)
    b = F.normalize(target.flatten(1), dim=0)
    ia, ib = index(src_kps), index(trg_kps)
    forward = F.cross_entropy(a[:, ia].T @ b / temperature, ib)
    backward = F.cross_entropy(b[:, ib].T @ a / temperature, ia)
    return (forward + backward) / 2


def match(source: torch.Tensor, target: torch.Tensor, src_kps: torch.Tensor,
          src_size: Tuple[int, int], trg_size: Tuple[int, int], upsample: int = 4
          ) -> torch.Tensor:
    """Predicted target keypoints ([x, y] in target pixels, on the CPU) of ``src_kps``
    (source pixels) by cosine nearest neighbour; ``source``/``target`` are (C, h, w) feature
    maps on any device."""
    _, h, w = source.shape
    grid = to_grid(src_kps.to(source.device).float(), src_size, (h, w))
    normalised = (grid + 0.5) / grid.new_tensor([w, h]) * 2 - 1
    vectors = F.grid_sample(source[None].float(), normalised[None, None], mode='bilinear',
                            align_corners=False)[0, :, 0]  # (C, K)
    fine = F.interpolate(target[None].float(), scale_factor=upsample, mode='bilinear',
                         align_corners=False)[0]
    fh, fw = fine.shape[1:]
    similarity = F.normalize(vectors, dim=0).T @ F.normalize(fine.flatten(1), dim=0)
    best = similarity.argmax(dim=1)
    points = torch.stack([best % fw, best // fw], dim=1).float().cpu()
    return (points + 0.5) * points.new_tensor([trg_size[0] / fw, trg_size[1] / fh]) - 0.5
