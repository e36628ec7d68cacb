"""The GATE guideline, quantitative: how much a generation technique suppresses content shift.

Diffusion features drift away from the input image as noise is added ("content shift"). The
paper measures the drift of a feature ``F`` against a reference ``F_ref``, the feature of the
clean image (t = 0), through their high-frequency content:

    diff(F) = sum over pixels of | ||Lap(F_ref)|| - ||Lap(F)|| |

with ``Lap`` a Laplacian filter applied per channel and ``||.||`` the norm over channels at a
pixel. A technique's suppression score is ``(diff_anchor - diff) / diff_anchor`` against an
anchor with strong content shift (no technique at a large timestep): 1 means no drift left, 0
as much drift as the anchor, negative more.
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

_LAPLACIAN = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]])


def laplacian_norm(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W): the channel norm of the per-channel Laplacian (replicated
    borders, so that the image edge is not an edge)."""
    channels = features.shape[1]
    kernel = _LAPLACIAN.to(features).expand(channels, 1, 3, 3)
    padded = F.pad(features.float(), (1, 1, 1, 1), mode='replicate')
    return F.conv2d(padded, kernel.float(), groups=channels).norm(dim=1)


def content_shift(reference: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """diff(F) per image: the summed absolute difference of the Laplacian norms (N, )."""
    if reference.shape != features.shape:
        raise ValueError(f'reference {tuple(reference.shape)} and features '
                         f'{tuple(features.shape)} differ in shape.')
    return (laplacian_norm(reference) - laplacian_norm(features)).abs().flatten(1).sum(1)


def suppression_score(diff: torch.Tensor, anchor_diff: torch.Tensor) -> torch.Tensor:
    """(diff_anchor - diff) / diff_anchor, per image."""
    return (anchor_diff - diff) / anchor_diff.clamp(min=torch.finfo(anchor_diff.dtype).tiny)


def summarize(scores: Sequence[float]) -> Dict[str, float]:
    values = torch.tensor(list(scores), dtype=torch.float64)
    std = values.std(unbiased=False).item() if len(values) > 1 else 0.0
    return dict(mean=values.mean().item(), std=std, min=values.min().item(),
                max=values.max().item(), n=len(values))


@torch.no_grad()
def measure_content_shift(source, images: torch.Tensor, timesteps: Sequence[int],
                          anchor_timestep: int, baseline: int = 0, seed: int = 0,
                          progress: bool = True) -> Dict:
    """Suppression scores of every variant of a feature ``source`` at every feature and
    timestep.

    The reference is the ``baseline`` variant's feature of the clean latent (t = 0), the
    anchor the same variant at ``anchor_timestep``; every (variant, timestep) is measured
    against them, one image at a time, with the same noise seed for all. Each timestep means
    what it means in a call of the source: a timestep the config reaches by guided denoising
    is measured that way. Features the baseline variant does not hold (another source's, in a
    composite kept apart) are left out.

    Returns ``dict(scores=..., diffs=..., summary=...)``: per feature, timestep and variant
    the per-image scores and diffs, and their mean, std, min and max.
    """
    from tqdm import tqdm
    steps = list(timesteps)
    for t in (0, anchor_timestep, *steps):
        source.check_timestep(t)  # every timestep valid before any work
    if not 0 <= baseline < source.num_variants:
        raise ValueError(f'baseline must index one of the {source.num_variants} variants '
                         f'(0-{source.num_variants - 1}), got {baseline}.')
    names = [f['module'] for f in source.feature_info]
    result = {kind: {name: {t: {} for t in steps} for name in names}
              for kind in ('scores', 'diffs')}
    anchor_diffs: Dict[str, List[float]] = {name: [] for name in names}
    passes = list(dict.fromkeys([0, anchor_timestep, *steps]))
    with tqdm(total=len(images) * len(passes), desc='content shift', unit='pass',
              disable=not progress) as bar:
        for image in images:
            by_t = {}
            for t in passes:
                by_t[t] = source(image[None], t, torch.Generator().manual_seed(seed))
                bar.update(1)
            reference = by_t[0][baseline]
            names = [name for name in names if name in reference]
            for name in names:
                anchor = content_shift(reference[name], by_t[anchor_timestep][baseline][name])
                anchor_diffs[name].append(anchor.item())
                for t in steps:
                    for v, feats in enumerate(by_t[t]):
                        if name not in feats:
                            continue
                        diff = content_shift(reference[name], feats[name])
                        result['diffs'][name][t].setdefault(v, []).append(diff.item())
                        result['scores'][name][t].setdefault(v, []).append(
                            suppression_score(diff, anchor).item())
    for kind in ('scores', 'diffs'):
        result[kind] = {name: by_t for name, by_t in result[kind].items() if name in names}
    result['summary'] = {name: {t: {v: summarize(s) for v, s in by_variant.items()}
                                for t, by_variant in by_t.items()}
                         for name, by_t in result['scores'].items()}
    result['anchor_diffs'] = {name: anchor_diffs[name] for name in names}
    return result


def markdown_table(result: Dict, variant_names: Sequence[str]) -> str:
    """One row per (tap, timestep), one column per variant: mean +- std of the score."""
    lines = ['| feature | t | ' + ' | '.join(variant_names) + ' |',
             '|---|---|' + '---|' * len(variant_names)]
    for name, by_t in result['summary'].items():
        for t, by_variant in by_t.items():
            cells = [f"{by_variant[v]['mean']:.3f} ± {by_variant[v]['std']:.3f}"
                     if v in by_variant else '-' for v in range(len(variant_names))]
            lines.append(f'| `{name}` | {t} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


__all__ = ['laplacian_norm', 'content_shift', 'suppression_score', 'measure_content_shift',
           'markdown_table', 'summarize']
