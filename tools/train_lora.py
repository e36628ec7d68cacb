"""Train a LoRA adapter for GATE on a few images of the target dataset, as the paper does.

    python tools/train_lora.py configs/lora/ade20k.py [--cfg-options key=value ...]

The base model stays frozen; a LoCon-style LoRA (attention and convolution layers) learns the
ordinary denoising loss on ``num_images`` random training images (latents encoded once).
Checkpoints ``lora_step<N>.safetensors`` are written every ``save_every`` steps (atomically)
in diffusers' LoRA format, with rank/alpha metadata, and load directly as a GATEBackbone
``loras`` entry. Keep a moderately trained one and a slightly overfit one (the paper's
LoRA A and B). A ``log.json`` records the loss.
"""
import argparse
import json
import os
import os.path as osp
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.config import Config, DictAction
from peft import LoraConfig
from PIL import Image

from mmseg_gate.fileio import atomic_file, remove_stale_temporaries
from mmseg_gate.models.diffusion.latents import encode_latents
from mmseg_gate.models.diffusion.loading import load_stable_diffusion
from mmseg_gate.models.diffusion.lora import save_lora_file
from mmseg_gate.models.diffusion.prompts import encode_prompt

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


def parse_args():
    parser = argparse.ArgumentParser(description='Train a LoRA adapter for GATE')
    parser.add_argument('config', help='LoRA training config (see configs/lora/)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    return parser.parse_args()


def pick_images(image_dir: str, num_images: int, seed: int) -> list:
    if not osp.isdir(image_dir):
        raise FileNotFoundError(f"image_dir '{image_dir}' does not exist; point it at the "
                                "dataset's training images.")
    files = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{image_dir}'.")
    random.Random(seed).shuffle(files)
    return [osp.join(image_dir, f) for f in files[:num_images]]


def load_square(path: str, resolution: int) -> torch.Tensor:
    """Shorter side resized to ``resolution``, centre crop, in [-1, 1]."""
    image = Image.open(path).convert('RGB')
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)),
                          max(resolution, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1


def encode_images(vae, paths, resolution: int) -> torch.Tensor:
    return torch.cat([encode_latents(vae, load_square(p, resolution)[None]) for p in paths])


def captions_for(cfg, paths) -> list:
    """One caption per image: ``captions`` maps file names to text (tags or sentences);
    images without one get ``caption`` (default: empty, as the paper's default)."""
    table = cfg.get('captions') or {}
    if isinstance(table, str):
        with open(table) as f:
            table = json.load(f)
    return [table.get(osp.basename(p), cfg.get('caption', '')) for p in paths]


def check_recipe(cfg) -> None:
    """Settings that would otherwise fail late or silently do nothing."""
    for key in ('steps', 'num_images', 'batch_size', 'rank', 'save_every', 'log_every',
                'resolution'):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{key} must be a positive integer, got {value!r} (set it in the '
                             f'config or with --cfg-options {key}=N).')
    if cfg.resolution % 8:
        raise ValueError(f'resolution must be a multiple of 8 (the VAE downsamples by 8), '
                         f'got {cfg.resolution}.')


def train(cfg) -> list:
    check_recipe(cfg)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.work_dir, exist_ok=True)
    remove_stale_temporaries(cfg.work_dir)  # files of a run killed while saving
    parts = load_stable_diffusion(cfg.sd_model)
    unet, vae, scheduler = parts.unet, parts.vae.eval(), parts.scheduler
    paths = pick_images(cfg.image_dir, cfg.num_images, cfg.seed)
    latents = encode_images(vae, paths, cfg.resolution)
    # As in Stable Diffusion's own training, captions are cut to one 77-token chunk.
    embeds = [encode_prompt(parts.text_encoders, parts.tokenizers, c)
              for c in captions_for(cfg, paths)]
    contexts = torch.cat([e.hidden[:, :77] for e in embeds])
    # SDXL's added conditions: pooled caption embedding, and the training size (no crop).
    pooled = torch.cat([e.pooled for e in embeds]) if parts.is_sdxl else None
    time_ids = torch.tensor([[cfg.resolution, cfg.resolution, 0, 0, cfg.resolution,
                              cfg.resolution]], dtype=torch.float32)
    del parts
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights='gaussian',
                                target_modules=list(cfg.target_modules)))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(cfg.seed)
    print(f'[train_lora] {len(paths)} images, rank {cfg.rank}, alpha {cfg.alpha}, '
          f'{sum(p.numel() for p in params):,} trainable parameters, {cfg.steps} steps')
    log, start = [], time.time()
    unet.train()
    for step in range(1, cfg.steps + 1):
        index = torch.randint(0, len(paths), (cfg.batch_size, ), generator=generator)
        x0 = latents[index]
        if torch.rand(1, generator=generator).item() < 0.5:
            x0 = x0.flip(-1)  # horizontal flip, in latent space
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0), ),
                          generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t) \
            if scheduler.config.prediction_type == 'v_prediction' else noise
        added = None if pooled is None else dict(text_embeds=pooled[index],
                                                 time_ids=time_ids.expand(len(index), -1))
        pred = unet(noisy, t, contexts[index], added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), target.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log.append(dict(step=step, loss=loss.item()))
        if step % cfg.log_every == 0 or step == cfg.steps:
            recent = np.mean([e['loss'] for e in log[-cfg.log_every:]])
            print(f'[train_lora] step {step}/{cfg.steps}  loss {recent:.4f}  '
                  f'{time.time() - start:.0f}s', flush=True)
        if step % cfg.save_every == 0 or step == cfg.steps:
            path = osp.join(cfg.work_dir, f'lora_step{step}.safetensors')
            print(f'[train_lora] saved {save_lora_file(unet, path)}', flush=True)
    with atomic_file(osp.join(cfg.work_dir, 'log.json')) as tmp, open(tmp, 'w') as f:
        json.dump(dict(images=paths, losses=log), f)
    return log


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    train(cfg)


if __name__ == '__main__':
    main()
