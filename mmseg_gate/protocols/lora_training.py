"""The paper's LoRA recipe: adapters trained with the model's own training loss on a few
images of the target dataset, for Stable Diffusion UNets (here) and diffusion transformers
(``dit_lora_training.py``), on one loop.

:class:`LoRATrainerBase` is that loop: the images (picked by the seed, latents encoded once),
their captions, the steps with a progress bar (loss and ETA), and every ``save_every`` steps
``lora_step<N>.safetensors`` (the format the sources load) and ``last_state.pth`` (the one
training-state format of :func:`~mmseg_gate.engine.checkpoint.save_training_state`: step,
LoRA and optimizer state, random state, the recipe's settings), both atomically, so a killed
run resumes where it saved (``resume=True``) -- with the same settings; ``steps``,
``save_every`` and ``log_every`` may change, so a finished run can be continued. A family's
trainer loads its model, takes a step and writes its file.

``LoRATrainer(cfg).train()`` runs a UNet recipe (``configs/lora/*.py``) on any device: LoRAs
for the UNet (LoCon) and the text encoder(s), the ordinary denoising loss, the frozen weights
in half precision on accelerators (``mixed_precision``), the LoRA weights in float32, optional
gradient checkpointing.
"""
import json
import os
import os.path as osp
import random
from abc import ABC, abstractmethod
from contextlib import nullcontext
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets.images import list_images, read_square
from ..engine.checkpoint import load_training_state, save_training_state
from ..engine.devices import default_device, resolve_dtype
from ..fileio import atomic_file, remove_stale_temporaries
from ..sources.common.latents import encode_latents
from ..sources.common.lora import add_lora, save_lora_file
from ..sources.stable_diffusion.loading import load_stable_diffusion
from ..sources.stable_diffusion.prompts import chunk_token_ids, encode_token_ids, sdxl_time_ids

# CLIP's attention projections: what text-encoder LoRAs (diffusers' recipe) adapt.
TEXT_ENCODER_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'out_proj')
STATE_FILE = 'last_state.pth'
STATE_KIND = 'lora'  # of the training state in STATE_FILE


def check_common(cfg) -> None:
    """The settings every LoRA recipe has, checked before anything loads."""
    if 'sd_model' in cfg:
        raise ValueError('The LoRA recipe calls the weights `model` (as every source does), not '
                         '`sd_model`: write model = ... in the config.')
    for key in ('steps', 'num_images', 'batch_size', 'rank', 'save_every', 'log_every',
                'resolution'):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{key} must be a positive integer, got {value!r} (set it in the '
                             f'config or with --cfg-options {key}=N).')
    alpha = cfg.get('alpha')
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f'alpha must be a positive number (the LoRA scales by alpha / rank), '
                         f'got {alpha!r}.')


def check_recipe(cfg) -> None:
    """A UNet recipe's settings that would otherwise fail late or silently do nothing."""
    check_common(cfg)
    if cfg.resolution % 8:
        raise ValueError(f'resolution must be a multiple of 8 (the VAE downsamples by 8), '
                         f'got {cfg.resolution}.')
    if cfg.get('text_encoder_lr', 0) < 0 or cfg.unet_lr <= 0:
        raise ValueError('unet_lr must be positive and text_encoder_lr non-negative (0: no '
                         'text-encoder LoRA).')


def pipeline_name(model: str) -> Optional[str]:
    """The pipeline class a diffusers folder (or cached hub id) names in its
    ``model_index.json``; None where there is none to read (the loaders then say why)."""
    from diffusers import DiffusionPipeline
    try:
        return DiffusionPipeline.load_config(model).get('_class_name')
    except (OSError, ValueError):
        return None


def is_dit_model(model: str) -> bool:
    """Whether ``model`` holds a diffusion-transformer pipeline (SD3.x, FLUX.1)."""
    from ..sources.dit import KINDS
    return pipeline_name(model) in KINDS


def pick_images(image_dir: str, num_images: int, seed: int) -> List[str]:
    if not osp.isdir(image_dir):
        raise FileNotFoundError(f"image_dir '{image_dir}' does not exist; point it at the "
                                "dataset's training images.")
    files = list_images(image_dir)
    random.Random(seed).shuffle(files)
    return [osp.join(image_dir, f) for f in files[:num_images]]


def captions_for(cfg, paths: List[str]) -> List[str]:
    """One caption per image: ``captions`` maps file names to text (tags or sentences, e.g.
    from tools/caption.py); images without one get ``caption`` (default: empty, the paper's
    default)."""
    table = cfg.get('captions') or {}
    if isinstance(table, str):
        with open(table, encoding='utf-8') as f:
            table = json.load(f)
    return [table.get(osp.basename(p), cfg.get('caption', '')) for p in paths]


class LoRATrainerBase(ABC):
    """The loop every LoRA recipe shares (module docstring); a model family's trainer
    implements :meth:`_prepare`, :meth:`_step`, :meth:`_save_lora`, :meth:`lora_models`,
    :meth:`_resume_settings` and :attr:`denoiser`.

    Args:
        cfg: the recipe (``configs/lora/*.py``): at least ``model``, ``image_dir``,
            ``work_dir``, ``num_images``, ``resolution``, ``rank``, ``alpha``, ``steps``,
            ``batch_size``, ``save_every``, ``log_every``, ``caption``/``captions``, ``seed``.
        device: default CUDA when available.
        mixed_precision: 'auto', 'no', 'fp16' or 'bf16': the frozen weights' dtype and
            autocast (:meth:`frozen_dtype`); the LoRA weights stay float32.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
    """

    def __init__(self, cfg, device: Optional[torch.device] = None,
                 mixed_precision: str = 'auto', gradient_checkpointing: bool = False):
        self.check_recipe(cfg)
        self.cfg = cfg
        self.device = torch.device(device or default_device())
        self.dtype = self.frozen_dtype(mixed_precision, self.device)
        self.gradient_checkpointing = gradient_checkpointing

    # What each family does its own way.

    @staticmethod
    @abstractmethod
    def check_recipe(cfg) -> None:
        """Refuse settings that would fail late or silently do nothing."""

    @staticmethod
    def frozen_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
        """The frozen weights' dtype: 'auto' is float16 on accelerators."""
        return resolve_dtype(mixed_precision, device, 'mixed_precision')

    @property
    @abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The model whose LoRA learns the loss (UNet, transformer)."""

    @abstractmethod
    def _prepare(self) -> None:
        """Load the model, encode the images (:meth:`_encode_images`) and captions, add the
        LoRAs; set ``optimizer``, ``scaler`` and ``generator`` (all the run's randomness)."""

    @abstractmethod
    def _step(self, step: int) -> float:
        """One optimisation step; its loss."""

    @abstractmethod
    def lora_models(self) -> Dict[str, torch.nn.Module]:
        """Name -> model, for each model whose LoRA trains (its state is resumed by name)."""

    @abstractmethod
    def _save_lora(self, path: str) -> None:
        """Write the LoRA file the sources load, atomically."""

    @abstractmethod
    def _resume_settings(self) -> dict:
        """What a resumed run must share with the one that saved, to continue it exactly:
        everything but the length (``steps``) and the save and log intervals."""

    def _trained(self) -> str:
        """What trains, for the first log line."""
        return ' + '.join(self.lora_models())

    # Shared by every family.

    def _encode_images(self, vae) -> None:
        """Pick the recipe's images (``paths``), encode each once (``latents``: the VAE
        posterior's mode, shifted and scaled as the sources do, in float32) and read their
        ``captions``."""
        cfg = self.cfg
        self.paths = pick_images(cfg.image_dir, cfg.num_images, cfg.seed)
        with torch.no_grad():
            self.latents = torch.cat([
                encode_latents(vae, read_square(p, cfg.resolution)[0][None].to(self.device))
                for p in self.paths])
        self.captions = captions_for(cfg, self.paths)

    def _sample_batch(self):
        """(index, x0): ``batch_size`` random images of the recipe's and their latents, all
        flipped horizontally (in latent space) half of the time."""
        index = torch.randint(0, len(self.paths), (self.cfg.batch_size, ),
                              generator=self.generator)
        x0 = self.latents[index.to(self.device)]
        if torch.rand(1, generator=self.generator).item() < 0.5:
            x0 = x0.flip(-1)
        return index, x0

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) \
            if self.dtype != torch.float32 else nullcontext()

    def _optimize(self, loss: torch.Tensor, max_grad_norm: Optional[float] = None) -> None:
        """Backward (scaled for float16), gradients clipped to ``max_grad_norm`` when given,
        one optimizer step."""
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        if max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g['params']], max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def train(self, resume: bool = False, progress: bool = True) -> List[dict]:
        """Train (or continue from ``work_dir/last_state.pth``); returns the loss log."""
        from tqdm import tqdm
        cfg = self.cfg
        os.makedirs(cfg.work_dir, exist_ok=True)
        remove_stale_temporaries(cfg.work_dir)  # files of a run killed while saving
        self._prepare()
        log: List[dict] = []
        start = 1
        state_path = osp.join(cfg.work_dir, STATE_FILE)
        if resume and osp.isfile(state_path):
            log, start = self._load_state(state_path)
        print(f'[train_lora] {len(self.paths)} images, rank {cfg.rank}, alpha {cfg.alpha}, '
              f'{sum(p.numel() for g in self.optimizer.param_groups for p in g["params"]):,} '
              f'trainable parameters ({self._trained()}), {self.device}, '
              f'{str(self.dtype).replace("torch.", "")} frozen weights; '
              f'steps {start}-{cfg.steps}', flush=True)
        self.denoiser.train()
        bar = tqdm(range(start, cfg.steps + 1), initial=start - 1, total=cfg.steps,
                   desc='train_lora', disable=not progress)
        for step in bar:
            log.append(dict(step=step, loss=self._step(step)))
            if step % cfg.log_every == 0 or step == cfg.steps:
                recent = float(np.mean([e['loss'] for e in log[-cfg.log_every:]]))
                bar.set_postfix(loss=f'{recent:.4f}')
                if not progress:
                    print(f'[train_lora] step {step}/{cfg.steps}  loss {recent:.4f}',
                          flush=True)
            if step % cfg.save_every == 0 or step == cfg.steps:
                self._save(step, log)
        bar.close()
        with atomic_file(osp.join(cfg.work_dir, 'log.json')) as tmp, open(tmp, 'w') as f:
            json.dump(dict(images=self.paths, losses=log), f)
        return log

    def _save(self, step: int, log: List[dict]) -> None:
        from peft import get_peft_model_state_dict
        path = osp.join(self.cfg.work_dir, f'lora_step{step}.safetensors')
        self._save_lora(path)
        lora = {name: get_peft_model_state_dict(model)
                for name, model in self.lora_models().items()}
        state = dict(log=log, lora=lora, optimizer=self.optimizer.state_dict(),
                     scaler=self.scaler.state_dict(), generator=self.generator.get_state())
        save_training_state(osp.join(self.cfg.work_dir, STATE_FILE), STATE_KIND,
                            self._resume_settings(), step, state)
        print(f'[train_lora] saved {path}', flush=True)

    def _load_state(self, path: str):
        from peft import set_peft_model_state_dict
        step, state = load_training_state(path, STATE_KIND, self._resume_settings())
        models = self.lora_models()
        if set(state['lora']) != set(models):
            raise ValueError(f"'{path}' holds LoRAs for {sorted(state['lora'])} but this recipe "
                             f'trains {sorted(models)}; resume with the same config.')
        for name, model in models.items():
            result = set_peft_model_state_dict(model, state['lora'][name])
            if result.unexpected_keys:
                raise ValueError(f"'{path}': {len(result.unexpected_keys)} LoRA tensors of "
                                 f'{name} did not load (e.g. {result.unexpected_keys[:3]}); '
                                 'resume with the same config.')
        self.optimizer.load_state_dict(state['optimizer'])
        self.scaler.load_state_dict(state['scaler'])
        self.generator.set_state(state['generator'])
        print(f'[train_lora] resumed from {path} at step {step}', flush=True)
        return list(state['log']), step + 1


class LoRATrainer(LoRATrainerBase):
    """Trains the LoRA of a Stable Diffusion (UNet) recipe: LoCon-style UNet LoRA and, with
    ``text_encoder_lr > 0``, text-encoder LoRAs, with the ordinary denoising loss (the
    scheduler's epsilon or v-prediction target); SDXL with both text encoders and its size
    conditions. Diffusion transformers train with :class:`~mmseg_gate.protocols.
    dit_lora_training.DiTLoRATrainer` (``make_lora_trainer`` picks by the model).

    Args:
        cfg: the recipe (see ``configs/lora/_base_.py``): ``model``, ``image_dir``,
            ``work_dir``, ``num_images``, ``resolution``, ``rank``, ``alpha``,
            ``target_modules``, ``unet_lr``, ``text_encoder_lr`` (0: UNet only), ``steps``,
            ``batch_size``, ``save_every``, ``log_every``, ``caption``/``captions``, ``seed``.
        device: default CUDA when available.
        mixed_precision: 'auto' (fp16 on accelerators), 'no', 'fp16' or 'bf16': the frozen weights'
            dtype and autocast; the LoRA weights stay float32.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
    """

    check_recipe = staticmethod(check_recipe)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def _prepare(self):
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig
        cfg, device = self.cfg, self.device
        if is_dit_model(cfg.model):
            raise ValueError(f"'{cfg.model}' is a diffusion transformer ({pipeline_name(cfg.model)}"
                             '): train its LoRA with DiTLoRATrainer, which tools/train_lora.py '
                             'picks for it (configs/lora/ade20k_sd35.py, ade20k_flux.py).')
        torch.manual_seed(cfg.seed)  # the LoRAs' initialisation
        parts = load_stable_diffusion(cfg.model)
        vae = parts.vae.to(device).eval()
        self._encode_images(vae)  # in float32 (SDXL's VAE overflows in fp16)
        del vae
        self.unet, self.scheduler = parts.unet.to(device, self.dtype), parts.scheduler
        self.text_encoders = [t.to(device, self.dtype) for t in parts.text_encoders]
        self.is_sdxl = parts.is_sdxl
        # As in Stable Diffusion's own training, captions are cut to one 77-token chunk.
        self.token_ids = [torch.tensor([chunk_token_ids(tok, c)[0] for c in self.captions],
                                       device=device) for tok in parts.tokenizers]
        self.train_text = cfg.get('text_encoder_lr', 0) > 0
        models = [self.unet, *self.text_encoders]
        for model in models:
            model.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,
                                         init_lora_weights='gaussian',
                                         target_modules=list(cfg.target_modules)))
        groups = [dict(params=None, lr=cfg.unet_lr)]
        if self.train_text:
            for encoder in self.text_encoders:
                add_lora(encoder, LoraConfig(
                    r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights='gaussian',
                    target_modules=list(cfg.get('text_encoder_target_modules',
                                                TEXT_ENCODER_TARGETS))))
        else:
            self.fixed_context = self._encode_captions(torch.arange(len(self.paths)))
        cast_training_params(models, dtype=torch.float32)
        if self.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for encoder in self.text_encoders if self.train_text else []:
                # Non-reentrant: the LoRA gets gradients although the inputs need none.
                encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs=dict(use_reentrant=False))
        groups[0]['params'] = [p for p in self.unet.parameters() if p.requires_grad]
        if self.train_text:
            groups.append(dict(params=[p for e in self.text_encoders for p in e.parameters()
                                       if p.requires_grad], lr=cfg.text_encoder_lr))
        self.optimizer = torch.optim.AdamW(groups, weight_decay=1e-2)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.time_ids = sdxl_time_ids(cfg.resolution, cfg.resolution, 1, device=device)

    def _encode_captions(self, index: torch.Tensor):
        """Prompt states (and SDXL's pooled embedding) of the captions ``index``; with
        gradients into the text-encoder LoRA when it trains."""
        with nullcontext() if self.train_text else torch.no_grad():
            return encode_token_ids(self.text_encoders, [ids[index] for ids in self.token_ids])

    def _step(self, step: int) -> float:
        device = self.device
        index, x0 = self._sample_batch()
        noise = torch.randn(x0.shape, generator=self.generator).to(device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0), ),
                          generator=self.generator).to(device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        target = self.scheduler.get_velocity(x0, noise, t) \
            if self.scheduler.config.prediction_type == 'v_prediction' else noise
        with self._autocast():
            if self.train_text:
                context, pooled = self._encode_captions(index.to(device))
            else:
                context = self.fixed_context[0][index.to(device)]
                pooled = None if self.fixed_context[1] is None else \
                    self.fixed_context[1][index.to(device)]
            added = None if not self.is_sdxl else dict(
                text_embeds=pooled, time_ids=self.time_ids.expand(len(x0), -1))
            pred = self.unet(noisy.to(self.dtype), t, context, added_cond_kwargs=added).sample
            loss = F.mse_loss(pred.float(), target.float())
        self._optimize(loss)
        return loss.item()

    def _trained(self) -> str:
        return 'UNet + text encoder' if self.train_text else 'UNet'

    def _text_encoders_to_save(self) -> Dict[str, torch.nn.Module]:
        if not self.train_text:
            return {}
        names = ['text_encoder', 'text_encoder_2'][:len(self.text_encoders)]
        return dict(zip(names, self.text_encoders))

    def lora_models(self) -> Dict[str, torch.nn.Module]:
        return {'unet': self.unet, **self._text_encoders_to_save()}

    def _resume_settings(self) -> dict:
        """Everything but the length and intervals; images and captions by name and text, so
        a dataset moved elsewhere still resumes."""
        cfg = self.cfg
        text_targets = cfg.get('text_encoder_target_modules', TEXT_ENCODER_TARGETS)
        return dict(model=cfg.model, images=[osp.basename(p) for p in self.paths],
                    captions=self.captions, resolution=cfg.resolution, rank=cfg.rank,
                    alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                    text_encoder_target_modules=list(text_targets) if self.train_text else None,
                    unet_lr=cfg.unet_lr, text_encoder_lr=cfg.get('text_encoder_lr', 0),
                    batch_size=cfg.batch_size, seed=cfg.seed,
                    frozen_dtype=str(self.dtype).replace('torch.', ''))

    def _save_lora(self, path: str) -> None:
        save_lora_file(self.unet, path, text_encoders=self._text_encoders_to_save())
