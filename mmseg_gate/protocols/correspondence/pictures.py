"""Match pictures: source | target per pair, a line per keypoint to its match.
"""
from typing import List

import torch
from PIL import Image, ImageDraw

from ...datasets.images import read_image
from ...evaluation.pck import pck


def draw_matches(pairs: List[dict], predictions: List[torch.Tensor], alpha: float = 0.1,
                 height: int = 192):
    """Source | target per row, each keypoint's match drawn as a line: green when correct
    (PCK@alpha per bbox), red when not; the ground truth as a small white ring."""
    rows = []
    for pair, pred in zip(pairs, predictions):
        src, trg = (read_image(pair[f'{s}_path']) for s in ('src', 'trg'))
        ss, ts = height / src.height, height / trg.height
        src = src.resize((max(1, round(src.width * ss)), height))
        trg = trg.resize((max(1, round(trg.width * ts)), height))
        canvas = Image.new('RGB', (src.width + trg.width, height))
        canvas.paste(src, (0, 0))
        canvas.paste(trg, (src.width, 0))
        draw = ImageDraw.Draw(canvas)
        correct = pck(pred, pair, alpha)['bbox']
        for (x, y), (u, v), (gu, gv), ok in zip(pair['src_kps'], pred.tolist(),
                                                 pair['trg_kps'], correct):
            colour = (40, 220, 40) if ok else (235, 40, 40)
            end = (src.width + u * ts, v * ts)
            draw.line([(x * ss, y * ss), end], fill=colour, width=2)
            draw.ellipse([end[0] - 3, end[1] - 3, end[0] + 3, end[1] + 3], fill=colour)
            g = (src.width + gu * ts, gv * ts)
            draw.ellipse([g[0] - 4, g[1] - 4, g[0] + 4, g[1] + 4], outline=(255, 255, 255))
        draw.text((4, 2), f"{pair['category']}: {int(correct.sum())}/{len(correct)}",
                  fill=(255, 255, 255))
        rows.append(canvas)
    width = max(r.width for r in rows)
    grid = Image.new('RGB', (width, height * len(rows)), (255, 255, 255))
    for i, row in enumerate(rows):
        grid.paste(row, (0, i * height))
    return grid
