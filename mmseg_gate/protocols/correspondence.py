"""Semantic correspondence with GATE features: SPair-71k's protocol, PCK@alpha.

Features of both images come from a :class:`GATEFeatureExtractor` (every variant, every tap).
Trained: an aggregation network -- per level, GATE's amalgamation of the variants, then a
bottleneck projection as in Diffusion Hyperfeatures, the levels mixed by learned softmax
weights -- learns from keypoint pairs with the symmetric contrastive loss (DHF's and the GATE
authors': cross-entropy over all positions of the other image, both directions, temperature
0.07). Training-free (DIFT-style): the taps' raw features, each L2-normalised, concatenated and
averaged over the variants. Matching: each source keypoint's feature (bilinear) against every
position of the target's feature map upsampled 4x; nearest neighbour by cosine similarity.
PCK@alpha: a prediction is correct within alpha * max(H, W) of the target image ("per image")
or alpha * max(h, w) of the target bounding box ("per bbox"); reported per keypoint over all
pairs (DHF's and the GATE authors' figure) and as a mean over pairs (DIFT's), per category and
overall.
"""
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from PIL import Image

from ..datasets.images import read_image, read_square
from ..models.amalgamation import VariantAmalgamation, amalgamation_sparsity

Features = List[Dict[str, torch.Tensor]]  # per variant: tap -> (1, C, h, w)


class FeatureCache:
    """Features of images by path, each computed once with its own fixed noise (the frozen
    extractor gives the same features every time), the last ``capacity`` kept."""

    def __init__(self, extractor, image_size: int, seed: int = 0, capacity: int = 256):
        self.extractor, self.image_size, self.seed = extractor, image_size, seed
        self.capacity, self.store = capacity, OrderedDict()

    def __call__(self, path: str) -> Features:
        if path in self.store:
            self.store.move_to_end(path)
            return self.store[path]
        image, _ = read_square(path, self.image_size, crop=False)  # the authors: plain resize
        with torch.no_grad():  # the noise is drawn on the CPU: the same on every device
            feats = self.extractor(image[None].to(self.extractor.device),
                                   generator=torch.Generator().manual_seed(self.seed))
        self.store[path] = feats
        if len(self.store) > self.capacity:
            self.store.popitem(last=False)
        return feats


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
        feature_info: the extractor's ``feature_info`` (name, channels, stride per level).
        num_variants: the extractor's number of variants.
        projection_dim: channels of the output (DHF: 384).
        num_assigners, hidden_channels, dropout_ratio: of each level's amalgamation.
    """

    def __init__(self, feature_info: List[dict], num_variants: int, projection_dim: int = 384,
                 num_assigners: int = 1, hidden_channels: int = 128,
                 dropout_ratio: float = 0.5):
        super().__init__()
        self.names = [info['name'] for info in feature_info]
        self.amalgamations = nn.ModuleList(
            VariantAmalgamation(info['channels'], num_variants, num_assigners,
                                hidden_channels, dropout_ratio) for info in feature_info)
        self.bottlenecks = nn.ModuleList(
            Bottleneck(a.out_channels, projection_dim) for a in self.amalgamations)
        self.mixing_weights = nn.Parameter(torch.ones(len(feature_info)))

    def forward(self, feats: Features) -> torch.Tensor:
        """(N, projection_dim, h, w) at the finest level's resolution."""
        levels = [bottleneck(amalgamation([variant[name] for variant in feats]))
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


def raw_features(feats: Features, names: Sequence[str] = None) -> torch.Tensor:
    """Training-free features: each tap L2-normalised over channels, resized to the finest
    tap's grid, concatenated, averaged over the variants."""
    names = list(names or feats[0])
    size = max((feats[0][n].shape[2:] for n in names), key=lambda s: s[0] * s[1])
    per_variant = [torch.cat([F.interpolate(F.normalize(v[n].float(), dim=1), size=size,
                                            mode='bilinear', align_corners=False)
                              for n in names], dim=1) for v in feats]
    return torch.stack(per_variant).mean(dim=0)


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


def pck(pred: torch.Tensor, pair: dict, alpha: float = 0.1) -> Dict[str, np.ndarray]:
    """Correct predictions within alpha of the target image ('img') or bounding box
    ('bbox') size."""
    gt = torch.tensor(pair['trg_kps'], dtype=torch.float32)
    distance = (pred.float() - gt).norm(dim=1).numpy()
    width, height = pair['trg_imsize'][:2]
    x1, y1, x2, y2 = pair['trg_bndbox']
    return dict(img=distance <= alpha * max(width, height),
                bbox=distance <= alpha * max(x2 - x1, y2 - y1))


def summarize_pck(correct: List[Tuple[str, Dict[str, np.ndarray]]]) -> Dict:
    """Per category and overall: PCK per keypoint (all keypoints of all pairs) and per pair
    (mean of the pairs' PCK), for 'img' and 'bbox', in percent."""
    def stats(items):
        out = {}
        for kind in ('img', 'bbox'):
            flags = [c[kind] for _, c in items]
            out[f'pck_{kind}'] = 100 * float(np.concatenate(flags).mean())
            out[f'pck_{kind}_per_pair'] = 100 * float(np.mean([f.mean() for f in flags]))
        out['pairs'] = len(items)
        out['keypoints'] = int(sum(len(c['img']) for _, c in items))
        return out

    categories = sorted({category for category, _ in correct})
    return dict(overall=stats(correct),
                per_category={c: stats([x for x in correct if x[0] == c]) for c in categories})


def evaluate(pairs: List[dict], features: Callable[[str], torch.Tensor], alpha: float = 0.1,
             progress: bool = True) -> Tuple[Dict, List[torch.Tensor]]:
    """PCK over ``pairs`` with ``features(path) -> (C, h, w)``; also the predictions."""
    from tqdm import tqdm
    correct, predictions = [], []
    for pair in tqdm(pairs, desc='matching', unit='pair', disable=not progress):
        pred = match(features(pair['src_path']), features(pair['trg_path']),
                     torch.tensor(pair['src_kps'], dtype=torch.float32),
                     tuple(pair['src_imsize'][:2]), tuple(pair['trg_imsize'][:2]))
        predictions.append(pred)
        correct.append((pair['category'], pck(pred, pair, alpha)))
    return summarize_pck(correct), predictions


def batch_features(*feats: Features) -> Features:
    """Several images' features as one batch (per variant, per tap)."""
    return [{name: torch.cat([f[v][name] for f in feats]) for name in feats[0][v]}
            for v in range(len(feats[0]))]


def save_aggregator(aggregator: nn.Module, path: str) -> None:
    from safetensors.torch import save_file

    from ..fileio import atomic_file
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous()
                   for k, v in aggregator.state_dict().items()}, tmp)


def load_aggregator(aggregator: nn.Module, path: str) -> None:
    """Load a saved aggregator completely (every tensor, matching shapes) or fail."""
    from safetensors.torch import load_file
    try:
        state = load_file(path)
        aggregator.load_state_dict(state, strict=True)
    except Exception as err:  # missing file, not safetensors, other keys or shapes
        raise ValueError(f"Cannot load the aggregation network from '{path}' ({err}). It must "
                         'be a checkpoint `tools/correspondence.py train` wrote for this '
                         'config.') from err


def earlier_best(work_dir: str) -> Optional[Dict]:
    """The validation score of the ``best.safetensors`` an earlier run left in ``work_dir``
    (None if there is none), so that a rerun never replaces a better model with a worse one."""
    import json
    import os.path as osp
    log = osp.join(work_dir, 'training.json')
    if not (osp.isfile(log) and osp.isfile(osp.join(work_dir, 'best.safetensors'))):
        return None
    try:
        with open(log, encoding='utf-8') as f:
            best = json.load(f)['best']
        float(best['pck_bbox']), int(best['step'])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"'{log}' is not the training log of tools/correspondence.py ({err}); "
                         'remove it, or the whole work dir, to train from scratch.') from err
    return dict(best, earlier_run=True)


def train_aggregator(aggregator: CorrespondenceAggregator, cache: FeatureCache,
                     train_pairs: List[dict], val_pairs: List[dict], work_dir: str,
                     steps: int = 10000, lr: float = 5e-4, weight_decay: float = 0.01,
                     temperature: float = 0.07, sparsity: float = 0.0, val_every: int = 500,
                     alpha: float = 0.1, seed: int = 0, progress: bool = True) -> Dict:
    """Train on keypoint pairs (one pair per step, AdamW), validate every ``val_every``
    steps and keep the best by validation PCK@alpha per bbox (``best.safetensors``). A
    ``best.safetensors`` an earlier run left is replaced only by a better model."""
    import json
    import os.path as osp

    from tqdm import tqdm

    from ..fileio import atomic_file
    device = next(aggregator.parameters()).device
    optimizer = torch.optim.AdamW(aggregator.parameters(), lr=lr, weight_decay=weight_decay)
    order = np.random.default_rng(seed).permutation(len(train_pairs))
    best, history = earlier_best(work_dir), []
    if best is not None:
        print(f"[correspondence] {work_dir} holds best.safetensors of an earlier run (val "
              f"PCK bbox {best['pck_bbox']:.2f} at step {best['step']}): kept unless this run "
              'beats it')
    bar = tqdm(range(1, steps + 1), desc='training', unit='step', disable=not progress)
    for step in bar:
        pair = train_pairs[order[(step - 1) % len(order)]]
        aggregator.train()
        feats = batch_features(cache(pair['src_path']), cache(pair['trg_path']))
        out = aggregator([{k: v.to(device) for k, v in f.items()} for f in feats]).float()
        grid = out.shape[2:]
        loss = keypoint_loss(
            out[0], out[1],
            to_grid(torch.tensor(pair['src_kps'], device=device), pair['src_imsize'][:2], grid),
            to_grid(torch.tensor(pair['trg_kps'], device=device), pair['trg_imsize'][:2], grid),
            temperature)
        total = loss
        if sparsity:  # the authors' term, shifted to 0 in value: gradient -lambda*L/s*ds
            s = aggregator.sparsity()
            total = loss - sparsity * loss.detach() * (s / s.detach() - 1)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        bar.set_postfix(loss=f'{loss.item():.3f}')
        if step % val_every == 0 or step == steps:
            score = validate(aggregator, cache, val_pairs, alpha)
            history.append(dict(step=step, loss=loss.item(), **score))
            if best is None or score['pck_bbox'] > best['pck_bbox']:
                best = dict(step=step, **score)
                save_aggregator(aggregator, osp.join(work_dir, 'best.safetensors'))
            with atomic_file(osp.join(work_dir, 'training.json')) as tmp, open(tmp, 'w') as f:
                json.dump(dict(best=best, history=history), f, indent=1)
            print(f"[correspondence] step {step}: val PCK@{alpha} bbox {score['pck_bbox']:.2f}"
                  f", img {score['pck_img']:.2f} (best {best['pck_bbox']:.2f} at step "
                  f"{best['step']})")
    return dict(best=best, history=history)


def aggregated(aggregator: nn.Module, cache: FeatureCache) -> Callable[[str], torch.Tensor]:
    """``path -> (C, h, w)``: the aggregator's features of an image (eval mode)."""
    device = next(aggregator.parameters()).device

    def features(path: str) -> torch.Tensor:
        aggregator.eval()
        with torch.no_grad():
            return aggregator([{k: v.to(device) for k, v in f.items()}
                               for f in cache(path)])[0]
    return features


def validate(aggregator, cache, pairs, alpha) -> Dict[str, float]:
    results, _ = evaluate(pairs, aggregated(aggregator, cache), alpha, progress=False)
    return results['overall']


def draw_matches(pairs: List[dict], predictions: List[torch.Tensor], alpha: float = 0.1,
                 height: int = 192):
    """Source | target per row, each keypoint's match drawn as a line: green when correct
    (PCK@alpha per bbox), red when not; the ground truth as a small white ring."""
    from PIL import ImageDraw
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
