"""Keypoints on feature grids, the training loss over keypoint pairs, and matching.
"""
from typing import Tuple, Union

import torch
import torch.nn.functional as F


def to_grid(kps: torch.Tensor, image_size: Tuple[int, int], grid: Tuple[int, int],
            pixel_centres: bool = True) -> torch.Tensor:
    """[x, y] in pixels of a (W, H) image -> [x, y] on an (h, w) grid: with
    ``pixel_centres``, pixel centres map onto cell centres; without, coordinates are scaled
    as they are (Diffusion Hyperfeatures' and the GATE authors' ``rescale_points``). SPair's
    keypoints are integers: computed in float."""
    kps = kps.float()
    scale = kps.new_tensor([grid[1] / image_size[0], grid[0] / image_size[1]])
    return (kps + 0.5) * scale - 0.5 if pixel_centres else kps * scale


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
          src_size: Tuple[int, int], trg_size: Tuple[int, int], upsample: int = 4,
          size: Union[int, str, None] = None, pixel_centres: bool = True) -> torch.Tensor:
    """Predicted target keypoints ([x, y] in target pixels, on the CPU) of ``src_kps``
    (source pixels) by cosine nearest neighbour; ``source``/``target`` are (C, h, w) feature
    maps on any device.

    Default: each source keypoint's feature is read bilinearly at its position and compared
    with the target map upsampled ``upsample`` times, positions as pixel centres. With
    ``size`` (the GATE authors' and Diffusion Hyperfeatures' 512) both maps are upsampled to
    ``size`` x ``size``, the source keypoint's vector is the one at its rounded position there
    and the prediction is scaled back; ``pixel_centres=False`` scales coordinates as they do
    (no half-pixel offset). ``size='original'`` upsamples each map to its own image's
    original size (DIFT's and DiTF's evaluation): keypoints and predictions in pixels as
    they are."""
    if size is None:
        _, h, w = source.shape
        grid = to_grid(src_kps.to(source.device).float(), src_size, (h, w), pixel_centres)
        normalised = (grid + 0.5) / grid.new_tensor([w, h]) * 2 - 1
        vectors = F.grid_sample(source[None].float(), normalised[None, None], mode='bilinear',
                                align_corners=False)[0, :, 0]  # (C, K)
        fine = F.interpolate(target[None].float(), scale_factor=upsample, mode='bilinear',
                             align_corners=False)[0]
    else:
        src_hw, trg_hw = ((src_size[1], src_size[0]), (trg_size[1], trg_size[0])) \
            if size == 'original' else ((size, size), (size, size))
        fine_source = F.interpolate(source[None].float(), size=src_hw, mode='bilinear',
                                    align_corners=False)[0]
        grid = to_grid(src_kps.to(source.device).float(), src_size, src_hw, pixel_centres)
        x = grid[:, 0].round().clamp(0, src_hw[1] - 1).long()
        y = grid[:, 1].round().clamp(0, src_hw[0] - 1).long()
        vectors = fine_source[:, y, x]
        fine = F.interpolate(target[None].float(), size=trg_hw, mode='bilinear',
                             align_corners=False)[0]
    fh, fw = fine.shape[1:]
    similarity = F.normalize(vectors, dim=0).T @ F.normalize(fine.flatten(1), dim=0)
    best = similarity.argmax(dim=1)
    # Target pixels in float64, as the benchmarks rescale (numpy): PCK compares at the edge.
    points = torch.stack([best % fw, best // fw], dim=1).double().cpu()
    scale = points.new_tensor([trg_size[0] / fw, trg_size[1] / fh])
    return (points + 0.5) * scale - 0.5 if pixel_centres else points * scale
