"""The GATE guideline as a tool: measure and show how much each variant of a config
suppresses content shift.

    python tools/content_shift.py CONFIG IMAGE [IMAGE ...] [--out DIR]
        [--variants 0 1 2] [--timesteps 50 200] [--anchor-timestep 500] [--baseline 0]
        [--taps ...] [--size 512] [--checkpoint CKPT] [--no-reconstruct]
        [--strength 0.8] [--steps 50] [--guidance-scale 7.5] [--device cuda] [--seed 0]
        [--cfg-options key=value ...]

Writes to ``--out`` (default ``work_dirs/content_shift/<config>``):

- ``content_shift.json`` and ``content_shift.md``: per tap, timestep and variant, the
  suppression score ``(diff_anchor - diff) / diff_anchor`` (mean +- std over the images), with
  the reference at t = 0 and the anchor at ``--anchor-timestep``, both of the ``--baseline``
  variant (``mmseg_gate/analysis/content_shift.py``);
- ``features_<image>.png``: per tap (the config's, plus an attention tap), the input and each
  variant's feature map at the config's timestep as a joint PCA -> RGB;
- ``reconstruction_<image>.png``: the input and each variant's img2img reconstruction at high
  strength (diffusers' pipelines; ``--no-reconstruct`` skips them);
- with ``--checkpoint`` (a trained segmentor of this config): ``amalgamation_weights.png``, the
  mean weight the amalgamation gives each variant per level on these images.
"""
import argparse
import json
import os
import os.path as osp

import torch
from mmengine.config import Config, DictAction
from tqdm import tqdm

import mmseg_gate  # noqa: F401  (registers the plugin)
from mmseg_gate import GATEFeatureExtractor
from mmseg_gate.analysis.content_shift import (markdown_table, measure_content_shift,
                                               variant_label)
from mmseg_gate.analysis.pictures import amalgamation_bars, feature_grid, save_png
from mmseg_gate.datasets.images import read_square
from mmseg_gate.engine.devices import default_device
from mmseg_gate.fileio import atomic_file
from mmseg_gate.models.diffusion.extractor import extractor_kwargs


def parse_args():
    parser = argparse.ArgumentParser(description='Measure and show content shift')
    parser.add_argument('config')
    parser.add_argument('images', nargs='+')
    parser.add_argument('--out', help='output folder')
    parser.add_argument('--variants', type=int, nargs='+', help="indices of the config's "
                        'variants to compare (default: all)')
    parser.add_argument('--timesteps', type=int, nargs='+', help='timesteps to measure at '
                        "(default: the config's)")
    parser.add_argument('--anchor-timestep', type=int, default=500,
                        help='the anchor: the baseline variant at this timestep')
    parser.add_argument('--baseline', type=int, default=0,
                        help='variant whose t=0 feature is the reference (default: the first)')
    parser.add_argument('--taps', nargs='+', help="UNet modules to read (default: the config's "
                        'plus a self-attention layer of the last tapped block)')
    parser.add_argument('--size', type=int, default=512, help='images are resized and centre '
                        'cropped to SIZE x SIZE')
    parser.add_argument('--checkpoint', help='trained segmentor: plot its amalgamation weights')
    parser.add_argument('--no-reconstruct', action='store_true')
    parser.add_argument('--strength', type=float, default=0.8)
    parser.add_argument('--steps', type=int, default=50)
    parser.add_argument('--guidance-scale', type=float, default=7.5)
    parser.add_argument('--device', default=default_device())
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-progress', action='store_true')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args()


def default_taps(extractor_cfg: dict) -> list:
    """The config's taps plus the first self-attention layer of the last tapped up block."""
    from mmseg_gate.models.diffusion.extractor import DEFAULT_TAPS
    taps = list(extractor_cfg.get('taps', DEFAULT_TAPS))
    last = sorted(t for t in taps if t.startswith('up_blocks.'))[-1:]
    if last:
        block = '.'.join(last[0].split('.')[:2])
        taps.append(f'{block}.attentions.0.transformer_blocks.0.attn1')
    return taps


def pick_variants(variants, indices, config: str) -> list:
    """The config's variants at ``indices`` (a config without ``variants`` has one)."""
    available = list(variants) if variants else [dict()]
    wrong = [i for i in indices if not 0 <= i < len(available)]
    if wrong:
        raise SystemExit(f"--variants {' '.join(map(str, wrong))}: config '{config}' has "
                         f'{len(available)} variant(s), numbered 0-{len(available) - 1}.')
    return [available[i] for i in indices]


def main():
    args = parse_args()
    if not osp.isfile(args.config):
        raise SystemExit(f"Config '{args.config}' does not exist.")
    missing = [p for p in args.images if not osp.isfile(p)]
    if missing:
        raise SystemExit(f'Image(s) not found: {missing}.')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    kwargs = extractor_kwargs(cfg.model.backbone)
    if args.variants is not None:
        kwargs['variants'] = pick_variants(kwargs.get('variants'), args.variants, args.config)
    num_variants = len(kwargs.get('variants') or [dict()])
    if not 0 <= args.baseline < num_variants:
        raise SystemExit(f'--baseline {args.baseline}: there are {num_variants} variant(s) to '
                         f'compare, numbered 0-{num_variants - 1}.')
    kwargs['taps'] = args.taps or default_taps(kwargs)
    try:
        images = torch.stack([read_square(p, args.size)[0] for p in args.images])
    except ValueError as err:  # not an image, truncated
        raise SystemExit(str(err)) from err
    out = args.out or osp.join('work_dirs', 'content_shift',
                               osp.splitext(osp.basename(args.config))[0])
    os.makedirs(out, exist_ok=True)
    device = torch.device(args.device)
    extractor = GATEFeatureExtractor(**kwargs).to(device)
    images = images.to(device)
    labels = [variant_label(v, i) for i, v in enumerate(extractor.variants)]
    timesteps = args.timesteps or [extractor.timestep]
    try:
        for flag, values in (('--timesteps', timesteps), ('--anchor-timestep',
                                                          [args.anchor_timestep])):
            for t in values:
                extractor.noise_plan(t)
    except ValueError as err:
        raise SystemExit(f'{flag} {t}: {err}') from err
    result = measure_content_shift(extractor, images, timesteps, args.anchor_timestep,
                                   args.baseline, args.seed, not args.no_progress)
    report = dict(config=args.config, images=args.images, variants=labels,
                  baseline=args.baseline, anchor_timestep=args.anchor_timestep,
                  timesteps=timesteps, seed=args.seed, **result)
    with atomic_file(osp.join(out, 'content_shift.json')) as tmp, open(tmp, 'w') as f:
        json.dump(report, f, indent=1)
    with atomic_file(osp.join(out, 'content_shift.md')) as tmp, open(tmp, 'w') as f:
        f.write(f'Suppression score (1: no content shift, 0: as much as the anchor, variant '
                f'{args.baseline} at t={args.anchor_timestep}), mean ± std over '
                f'{len(args.images)} image(s):\n\n' + markdown_table(result, labels))
    names = [f['name'] for f in extractor.feature_info]
    stems = [osp.splitext(osp.basename(p))[0] for p in args.images]
    for stem, image in tqdm(list(zip(stems, images)), desc='feature pictures', unit='image',
                            disable=args.no_progress):
        feats = extractor(image[None], generator=torch.Generator().manual_seed(args.seed))
        save_png(feature_grid(image.cpu(), [{n: f[n].cpu() for n in names} for f in feats],
                              labels, names), osp.join(out, f'features_{stem}.png'))
    if not args.no_reconstruct:
        from mmseg_gate.analysis.pictures import labelled_grid, to_pil
        from mmseg_gate.analysis.reconstruction import Reconstructor
        backbone = cfg.model.backbone
        reconstructor = Reconstructor(kwargs['sd_model'], extractor.variants,
                                      dict(backbone.get('controlnets') or {}),
                                      dict(backbone.get('loras') or {}), device,
                                      extractor.dtype)
        for stem, image in tqdm(list(zip(stems, images)), desc='reconstructions',
                                unit='image', disable=args.no_progress):
            recons = reconstructor(image.cpu(), args.strength, args.steps,
                                   args.guidance_scale, args.seed)
            save_png(labelled_grid([[to_pil(image.cpu()), *recons]], ['input', *labels]),
                     osp.join(out, f'reconstruction_{stem}.png'))
    if args.checkpoint:
        plot_amalgamation(cfg, args.checkpoint, images, labels, out)
    print(f'[content_shift] wrote {out}/content_shift.json, content_shift.md and pictures')
    print(open(osp.join(out, 'content_shift.md')).read())


def plot_amalgamation(cfg, checkpoint: str, images: torch.Tensor, labels, out: str) -> None:
    """The mean weight each variant gets per level, from the trained segmentor."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    from mmseg_gate.engine.checkpoint import read_checkpoint
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    model = MODELS.build(cfg.model)
    model.load_state_dict(read_checkpoint(checkpoint)['state_dict'], strict=True)
    backbone = model.backbone.to(images.device).eval()
    mean, std = backbone.input_mean.to(images.device), backbone.input_std.to(images.device)
    with torch.no_grad():  # images in [-1, 1] -> the data preprocessor's normalisation
        backbone(((images + 1) * 127.5 - mean) / std)
    weights = {name: a.last_weights for name, a in zip(backbone.out_names,
                                                       backbone.fusion.amalgamations)
               if a.last_weights is not None}
    if weights:
        amalgamation_bars(weights, labels, osp.join(out, 'amalgamation_weights.png'))


if __name__ == '__main__':
    main()
