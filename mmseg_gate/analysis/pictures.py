"""Pictures of content shift: labelled PNG grids of images, reconstructions and features.

Feature maps become RGB through a PCA fitted jointly on every variant of one image at one
tap, so the same colour means the same feature direction across the variants of a row.
"""
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..datasets.images import from_model_range
from ..fileio import atomic_file

LABEL_HEIGHT = 14


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image."""
    array = from_model_range(image.clamp(-1, 1)).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def pca_rgb(features: Sequence[torch.Tensor]) -> List[Image.Image]:
    """(C, H, W) maps of one tap (one per variant) -> RGB images of their first three
    principal components, fitted on all of them together and scaled jointly to [0, 255]."""
    channels = features[0].shape[0]
    pixels = torch.cat([f.float().reshape(channels, -1).T for f in features])
    centred = pixels - pixels.mean(dim=0)
    components = min(3, channels)
    _, _, basis = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ basis[:components].T
    if components < 3:
        projected = torch.cat([projected, projected.new_zeros(len(projected), 3 - components)],
                              dim=1)
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    projected = (projected - low) / (high - low).clamp(min=1e-8)
    images, start = [], 0
    for f in features:
        count = f.shape[1] * f.shape[2]
        rgb = projected[start:start + count].reshape(f.shape[1], f.shape[2], 3)
        images.append(Image.fromarray((rgb.numpy() * 255).round().astype(np.uint8)))
        start += count
    return images


def labelled_grid(rows: Sequence[Sequence[Image.Image]], column_labels: Sequence[str],
                  row_labels: Optional[Sequence[str]] = None,
                  tile: int = 128) -> Image.Image:
    """A grid of ``tile``-wide tiles (nearest resize, aspect kept) with a label above each
    column and, optionally, one above each row."""
    font = ImageFont.load_default()
    tile_h = max(round(tile * im.height / im.width) for row in rows for im in row)
    row_h = tile_h + LABEL_HEIGHT * (2 if row_labels else 1)
    width = tile * max(len(r) for r in rows)
    grid = Image.new('RGB', (width, row_h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = r * row_h
        if row_labels:
            draw.text((2, top + 1), row_labels[r], fill=(0, 0, 0), font=font)
            top += LABEL_HEIGHT
        for c, image in enumerate(row):
            draw.text((c * tile + 2, top + 1), _fit(column_labels[c], tile, draw, font),
                      fill=(0, 0, 0), font=font)
            grid.paste(image.resize((tile, tile_h), Image.NEAREST),
                       (c * tile, top + LABEL_HEIGHT))
    return grid


def _fit(text: str, width: int, draw, font) -> str:
    while text and draw.textlength(text, font=font) > width - 4:
        text = text[:-2] + '…' if len(text) > 2 else text[:-1]
    return text


def feature_grid(image: torch.Tensor, per_variant: Sequence[Dict[str, torch.Tensor]],
                 variant_labels: Sequence[str], names: Sequence[str],
                 tile: int = 128) -> Image.Image:
    """One row per tap: the input, then each variant's feature map (joint PCA per row)."""
    rows, labels = [], []
    for name in names:
        maps = pca_rgb([variant[name][0] for variant in per_variant])
        rows.append([to_pil(image)] + maps)
        labels.append(name)
    return labelled_grid(rows, ['input', *variant_labels], labels, tile)


def save_png(image: Image.Image, path: str) -> str:
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    with atomic_file(path) as tmp:
        image.save(tmp, format='PNG')
    return path


def amalgamation_bars(weights: Dict[str, torch.Tensor], variant_labels: Sequence[str],
                      path: str) -> str:
    """Bar chart of the mean softmax weight each variant gets, per level, from an
    amalgamation's ``last_weights`` (assigners, variants, images, channels)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    levels = list(weights)
    means = np.array([weights[name].float().mean(dim=(0, 2, 3)).cpu().numpy()
                      for name in levels])
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(levels), 3.2), dpi=100)
    width = 0.8 / len(variant_labels)
    x = np.arange(len(levels))
    for v, label in enumerate(variant_labels):
        ax.bar(x + (v - (len(variant_labels) - 1) / 2) * width, means[:, v], width,
               label=label)
    ax.set_xticks(x, [name.replace('.upsamplers.0', '') for name in levels], fontsize=8)
    ax.set_ylabel('mean weight')
    ax.axhline(1 / len(variant_labels), color='grey', linewidth=0.8, linestyle='--')
    ax.legend(fontsize=7)
    ax.set_title('Amalgamation: weight per variant and level', fontsize=9)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format='png')
    plt.close(fig)
    return path
