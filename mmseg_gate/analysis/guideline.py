"""The GATE guideline end to end for a config: scores, feature pictures, reconstructions and
amalgamation weights, written to one folder (what ``tools/content_shift.py`` runs).

Arguments that cannot work (a variant the config does not have, a timestep outside the noise
schedule, a file that is not an image) raise :class:`UsageError` before any model work.
"""
import copy
import json
import os
import os.path as osp
from typing import List, Optional, Sequence

import torch
from tqdm import tqdm

from ..datasets.images import from_model_range, read_square
from ..engine.cli import UsageError
from ..fileio import atomic_file
from ..sources import build_source
from ..sources.dit import DiTSource
from ..sources.stable_diffusion import DEFAULT_TAPS, StableDiffusionSource
from ..store.manifest import to_plain, with_recorded_defaults
from .content_shift import markdown_table, measure_content_shift
from .pictures import amalgamation_bars, feature_grid, labelled_grid, save_png, to_pil


def pick_variants(variants: Optional[list], indices: Sequence[int], config: str) -> list:
    """The config's variants at ``indices`` (a config without ``variants`` has one)."""
    available = list(variants) if variants else [dict()]
    wrong = [i for i in indices if not 0 <= i < len(available)]
    if wrong:
        raise UsageError(f"--variants {' '.join(map(str, wrong))}: config '{config}' has "
                         f'{len(available)} variant(s), numbered 0-{len(available) - 1}.')
    return [available[i] for i in indices]


def default_taps(source_cfg: dict) -> list:
    """A Stable Diffusion config's taps plus the first self-attention layer of the last
    tapped up block (convolutional and attention features side by side)."""
    taps = list(source_cfg.get('taps', DEFAULT_TAPS))
    last = sorted(t for t in taps if t.startswith('up_blocks.'))[-1:]
    if last:
        block = '.'.join(last[0].split('.')[:2])
        taps.append(f'{block}.attentions.0.transformer_blocks.0.attn1')
    return taps


def guideline_source_cfg(source_cfg: dict, config: str, variants: Optional[Sequence[int]],
                         taps: Optional[Sequence[str]], baseline: int) -> dict:
    """The config's frozen half as the guideline measures it: the chosen variants, the taps
    to read (Stable Diffusion sources)."""
    cfg = copy.deepcopy(dict(source_cfg))
    is_sd = cfg.get('type', 'StableDiffusionSource') == 'StableDiffusionSource'
    if variants is not None:
        if not is_sd:
            raise UsageError('--variants picks variants of a Stable Diffusion source; this '
                             f"config's source is {cfg['type']}.")
        cfg['variants'] = pick_variants(cfg.get('variants'), variants, config)
    if is_sd:
        cfg['taps'] = list(taps) if taps else default_taps(cfg)
        num = len(cfg.get('variants') or [dict()])
        if not 0 <= baseline < num:
            raise UsageError(f'--baseline {baseline}: there are {num} variant(s) to compare, '
                             f'numbered 0-{num - 1}.')
    return cfg


def check_timesteps(source, timesteps: Sequence[int], anchor_timestep: int) -> None:
    for flag, values in (('--timesteps', timesteps), ('--anchor-timestep', [anchor_timestep])):
        for t in values:
            try:
                source.check_timestep(t)
            except ValueError as err:
                raise UsageError(f'{flag} {t}: {err}') from err


def read_images(paths: Sequence[str], size: int) -> torch.Tensor:
    missing = [p for p in paths if not osp.isfile(p)]
    if missing:
        raise UsageError(f'Image(s) not found: {missing}.')
    try:
        return torch.stack([read_square(p, size)[0] for p in paths])
    except ValueError as err:  # not an image, truncated
        raise UsageError(str(err)) from err


def run_guideline(cfg, config: str, image_paths: Sequence[str], out: str,
                  variants: Optional[Sequence[int]] = None,
                  timesteps: Optional[Sequence[int]] = None, anchor_timestep: int = 500,
                  baseline: int = 0, taps: Optional[Sequence[str]] = None, size: int = 512,
                  checkpoint: Optional[str] = None, reconstruct: bool = True,
                  strength: float = 0.8, steps: int = 50, guidance_scale: float = 7.5,
                  device: str = 'cpu', seed: int = 0, progress: bool = True) -> str:
    """Measure and picture content shift for the segmentor config ``cfg`` (loaded from
    ``config``); writes everything to ``out`` and returns the Markdown table."""
    source_cfg = guideline_source_cfg(cfg.model.backbone.source, config, variants, taps,
                                      baseline)
    images = read_images(image_paths, size)
    os.makedirs(out, exist_ok=True)
    source = build_source(source_cfg).to(device)
    if not 0 <= baseline < source.num_variants:
        raise UsageError(f'--baseline {baseline}: there are {source.num_variants} variant(s).')
    images = images.to(device)
    labels = [f'{i}: {name}' for i, name in enumerate(source.variant_names)]
    timesteps = list(timesteps or [getattr(source, 'timestep', 50)])
    check_timesteps(source, timesteps, anchor_timestep)
    result = measure_content_shift(source, images, timesteps, anchor_timestep, baseline, seed,
                                   progress)
    # The source as measured, with the options a store records (a DiT's treatment of
    # massive activations) and the massive channels a DiT discarded.
    report = dict(config=config, source=with_recorded_defaults(to_plain(dict(source_cfg))),
                  images=list(image_paths), variants=labels, baseline=baseline,
                  anchor_timestep=anchor_timestep, timesteps=timesteps, seed=seed, **result)
    if getattr(source, 'discarded', None) is not None:
        report['discarded_channels'] = source.discarded
    with atomic_file(osp.join(out, 'content_shift.json')) as tmp, open(tmp, 'w') as f:
        json.dump(report, f, indent=1)
    table = (f'Suppression score (1: no content shift, 0: as much as the anchor, variant '
             f'{baseline} at t={anchor_timestep}), mean ± std over {len(image_paths)} '
             f'image(s):\n\n' + markdown_table(result, labels))
    with atomic_file(osp.join(out, 'content_shift.md')) as tmp, open(tmp, 'w') as f:
        f.write(table)
    stems = [osp.splitext(osp.basename(p))[0] for p in image_paths]
    names = [f['module'] for f in source.feature_info]
    for stem, image in tqdm(list(zip(stems, images)), desc='feature pictures', unit='image',
                            disable=not progress):
        feats = source(image[None], generator=torch.Generator().manual_seed(seed))
        save_png(feature_grid(image.cpu(), [{n: f[n].cpu() for n in names if n in f}
                                            for f in feats], labels, names),
                 osp.join(out, f'features_{stem}.png'))
    if reconstruct and isinstance(source, (StableDiffusionSource, DiTSource)):
        write_reconstructions(source, source_cfg, images, stems, labels, out, strength, steps,
                              guidance_scale, seed, progress)
    if checkpoint:
        plot_amalgamation(cfg, checkpoint, images, out)
    return table


def write_reconstructions(source, source_cfg: dict, images: torch.Tensor, stems: List[str],
                          labels: List[str], out: str, strength: float, steps: int,
                          guidance_scale: float, seed: int, progress: bool) -> None:
    """img2img reconstructions per variant through diffusers' pipelines of the source's
    model (Stable Diffusion or a DiT), which load whole, with the VAE decoder."""
    controlnets = dict(source_cfg.get('controlnets') or {})
    loras = dict(source_cfg.get('loras') or {})
    device, dtype = images.device, source.dtype
    source.to('cpu')  # an accelerator holds the pipeline alone
    if isinstance(source, DiTSource):
        from .dit_reconstruction import DiTReconstructor
        reconstructor = DiTReconstructor(source, loras, controlnets,
                                         source_cfg.get('max_sequence_length'), device, dtype)
    else:
        from .reconstruction import Reconstructor
        reconstructor = Reconstructor(source.model, source.variants, controlnets, loras,
                                      device, dtype)
    for stem, image in tqdm(list(zip(stems, images)), desc='reconstructions', unit='image',
                            disable=not progress):
        recons = reconstructor(image.cpu(), strength, steps, guidance_scale, seed)
        save_png(labelled_grid([[to_pil(image.cpu()), *recons]], ['input', *labels]),
                 osp.join(out, f'reconstruction_{stem}.png'))


def plot_amalgamation(cfg, checkpoint: str, images: torch.Tensor, out: str) -> None:
    """The mean weight each of the trained segmentor's variants gets per level."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from ..engine.checkpoint import read_checkpoint
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    model = MODELS.build(cfg.model)
    model.load_state_dict(read_checkpoint(checkpoint)['state_dict'], strict=True)
    backbone = model.backbone.to(images.device).eval()
    mean, std = backbone.input_mean.to(images.device), backbone.input_std.to(images.device)
    with torch.no_grad():  # images in [-1, 1] -> the data preprocessor's normalisation
        backbone((from_model_range(images) - mean) / std)
    weights = {name: a.last_weights for name, a in zip(backbone.out_names,
                                                       backbone.fusion.amalgamations)
               if a.last_weights is not None}
    labels = [f'{i}: {name}' for i, name in enumerate(backbone.source.variant_names)]
    if weights:
        amalgamation_bars(weights, labels, osp.join(out, 'amalgamation_weights.png'))
