"""Train a LoRA adapter for GATE on a few images of the target dataset, as the paper does.

    python tools/train_lora.py configs/lora/ade20k.py [--device cuda] [--mixed-precision auto]
        [--gradient-checkpointing] [--resume] [--cfg-options key=value ...]

The base model stays frozen; the trainer is the model's (picked by its pipeline folder):

- Stable Diffusion UNets (``configs/lora/ade20k.py``, ``_base_.py``): LoCon-style LoRAs on the
  UNet (attention and convolution layers) and, with ``text_encoder_lr > 0`` (the paper's
  5e-5), on the text encoder(s), with the ordinary denoising loss;
- SD3.x and FLUX.1 transformers (``configs/lora/ade20k_sd35.py``, ``ade20k_flux.py``,
  ``_base_dit_.py``): a transformer LoRA with the flow-matching objective of diffusers'
  DreamBooth-LoRA scripts for SD3 and FLUX.

Both learn on ``num_images`` random training images (latents encoded once), with empty
captions or those of ``captions=`` (e.g. from tools/caption.py). Every ``save_every`` steps
``lora_step<N>.safetensors`` (rank/alpha metadata; loads directly as a source's ``loras``
entry; a DiT LoRA in diffusers' own format) and ``last_state.pth`` (for ``--resume``) are
written atomically. Keep a moderately trained checkpoint and a slightly overfit one (the
paper's LoRA A and B). A ``log.json`` records the loss. The logic lives in
``mmseg_gate/protocols/lora_training.py`` (the loop, UNets) and
``mmseg_gate/protocols/dit_lora_training.py`` (diffusion transformers).
"""
import argparse

import torch
from mmengine.config import DictAction

from mmseg_gate.engine.cli import read_config, run_tool
from mmseg_gate.engine.devices import default_device
from mmseg_gate.protocols.dit_lora_training import make_lora_trainer


def parse_args():
    parser = argparse.ArgumentParser(description='Train a LoRA adapter for GATE')
    parser.add_argument('config', help='LoRA training config (see configs/lora/)')
    parser.add_argument('--device', default=default_device())
    parser.add_argument('--mixed-precision', default='auto',
                        choices=['auto', 'no', 'fp16', 'bf16'],
                        help='dtype of the frozen weights and autocast (auto: fp16 on '
                        'accelerators, bf16 for diffusion transformers); LoRA weights stay '
                        'float32')
    parser.add_argument('--gradient-checkpointing', action='store_true',
                        help='recompute activations in the backward pass (less memory)')
    parser.add_argument('--resume', action='store_true',
                        help="continue from the work_dir's last_state.pth")
    parser.add_argument('--no-progress', action='store_true',
                        help='log lines instead of a progress bar')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = read_config(args.config, args.cfg_options)
    trainer = make_lora_trainer(cfg, torch.device(args.device), args.mixed_precision,
                                args.gradient_checkpointing)
    trainer.train(resume=args.resume, progress=not args.no_progress)


if __name__ == '__main__':
    run_tool('train_lora', main)
