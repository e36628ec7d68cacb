"""GATE's LoRA technique on diffusion transformers (SD3.x, FLUX.1): a peft LoRA on the frozen
transformer, trained with the rectified-flow (flow-matching) objective of diffusers'
``train_dreambooth_lora_sd3.py`` / ``train_dreambooth_lora_flux.py``, on the loop every LoRA
recipe shares (:class:`~mmseg_gate.protocols.lora_training.LoRATrainerBase`: images, captions,
saving, resuming, logging).

A step, as those scripts take it: ``u`` from ``compute_density_for_timestep_sampling``
(``weighting_scheme``: SD3's default 'logit_normal', FLUX's 'none', i.e. uniform), the index
``u * 1000`` into the pipeline scheduler's own sigmas and timesteps (SD3's shift is in them;
FLUX's scheduler shifts dynamically, so its training sigmas are unshifted), ``x_t = (1 -
sigma) x0 + sigma noise``, the transformer's prediction of the velocity ``noise - x0``, the
squared error weighted by ``compute_loss_weighting_for_sd3`` (1 unless 'sigma_sqrt' or
'cosmap'), gradients clipped to ``max_grad_norm``, AdamW. SD3's timestep is on the 0-1000
scale; FLUX's is divided by 1,000 and its guidance embedding (FLUX.1-dev) gets
``guidance_scale``; FLUX's latents are packed 2x2 into tokens with their position ids (the
DiT source's own helpers), and the loss is taken on the packed tokens (a permutation of the
latent, so the same mean). ``precondition_outputs=True`` is the SD3 script's default: the
prediction turned into an ``x0`` estimate (``x_t - sigma v``) and compared with ``x0``.

Captions are encoded once, by the pipeline's own ``encode_prompt`` (through the DiT source's
family classes), before the transformer loads; the text encoders are dropped after (no text
LoRA: the DiT source loads transformer LoRAs only). The file, ``lora_step<N>.safetensors``,
is what ``StableDiffusion3Pipeline.save_lora_weights`` / ``FluxPipeline.save_lora_weights``
write (``transformer.*`` peft keys, the LoRA config with rank and alpha as metadata), written
atomically; ``pipe.load_lora_weights`` and the DiT source's ``loras`` read it.

:func:`make_lora_trainer` picks the trainer of a recipe by its model's pipeline: this one for
SD3.x and FLUX.1 folders, :class:`~mmseg_gate.protocols.lora_training.LoRATrainer` for
Stable Diffusion UNets.
"""
import os.path as osp
from abc import abstractmethod
from typing import Dict, Optional, Sequence

import torch

from ..engine.devices import resolve_dtype
from ..fileio import atomic_file
from ..sources.common.loading import drop_vae_decoder, load_weights
from ..sources.dit import (FAMILY_CLASSES, GET_DIT_HINT, KINDS, dtype_kwargs, image_ids,
                           load_scheduler, pack_latents, read_kind)
from ..sources.dit.base import BATCHED
from .lora_training import LoRATrainer, LoRATrainerBase, check_common, pipeline_name

# What diffusers' DreamBooth-LoRA scripts adapt by default: every attention projection of
# SD3's joint blocks (the last block, context_pre_only, has no to_add_out; SD3.5's second
# attention, attn2, is not matched); on FLUX also the feed-forwards of the double-stream
# blocks (its single-stream blocks get their attention's to_q/k/v).
DIT_TARGETS = dict(
    sd3=('attn.add_k_proj', 'attn.add_q_proj', 'attn.add_v_proj', 'attn.to_add_out',
         'attn.to_k', 'attn.to_out.0', 'attn.to_q', 'attn.to_v'),
    flux=('attn.to_k', 'attn.to_q', 'attn.to_v', 'attn.to_out.0', 'attn.add_k_proj',
          'attn.add_q_proj', 'attn.add_v_proj', 'attn.to_add_out', 'ff.net.0.proj',
          'ff.net.2', 'ff_context.net.0.proj', 'ff_context.net.2'))
# The scripts' default timestep sampling per family (recipe ``weighting_scheme=None``).
DEFAULT_WEIGHTING = dict(sd3='logit_normal', flux='none')
WEIGHTING_SCHEMES = ('logit_normal', 'mode', 'none', 'sigma_sqrt', 'cosmap')
# The transformer's inputs given in the frozen weights' dtype (it casts the rest itself).
FROZEN_DTYPE_INPUTS = ('hidden_states', 'encoder_hidden_states', 'pooled_projections')
# Keys of a UNet recipe that mean nothing here.
UNET_ONLY = ('unet_lr', 'text_encoder_lr', 'text_encoder_target_modules')


def check_dit_recipe(cfg) -> None:
    """A DiT recipe's settings (``configs/lora/_base_dit_.py``) that would otherwise fail
    late or silently do nothing."""
    check_common(cfg)
    stray = [key for key in UNET_ONLY if cfg.get(key) not in (None, 0)]
    if stray:
        raise ValueError(f'{stray} are settings of UNet LoRA recipes; a DiT recipe trains the '
                         'transformer only, at transformer_lr (base it on '
                         "configs/lora/_base_dit_.py, or set them to None).")
    if cfg.resolution % 16:
        raise ValueError(f'resolution must be a multiple of 16 (the VAE downsamples by 8, the '
                         f'transformer takes 2x2 latent patches), got {cfg.resolution}.')
    for key, low in (('transformer_lr', 'positive'), ('weight_decay', 'non-negative'),
                     ('max_grad_norm', 'non-negative'), ('logit_std', 'positive')):
        value = cfg.get(key)
        if key == 'max_grad_norm' and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (value <= 0 if low == 'positive' else value < 0):
            raise ValueError(f'{key} must be a {low} number, got {value!r}.')
    for key in ('logit_mean', 'mode_scale', 'guidance_scale'):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f'{key} must be a number, got {value!r}.')
    scheme = cfg.get('weighting_scheme')
    if scheme is not None and scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f'weighting_scheme must be None (the family\'s default: '
                         f'{DEFAULT_WEIGHTING}) or one of {list(WEIGHTING_SCHEMES)}, got '
                         f'{scheme!r}.')
    targets = cfg.get('target_modules')
    if targets is not None and (isinstance(targets, str) or not targets or
                                not all(isinstance(t, str) and t for t in targets)):
        raise ValueError('target_modules must be None (diffusers\' scripts\' targets for the '
                         f'family: {DIT_TARGETS}) or a non-empty list of module names, got '
                         f'{targets!r}.')
    length = cfg.get('max_sequence_length')
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                               or length < 1):
        raise ValueError(f'max_sequence_length must be None (the pipeline\'s default) or a '
                         f'positive integer, got {length!r}.')


def write_dit_lora(path: str, kind: str, state: Dict[str, torch.Tensor], config: dict) -> str:
    """A transformer LoRA (``state``: peft's keys, as ``get_peft_model_state_dict`` returns
    them; ``config``: its ``LoraConfig.to_dict()``) as the family's pipeline writes it
    (``save_lora_weights``: ``transformer.*`` keys, the config as adapter metadata), atomically."""
    pipeline = FAMILY_CLASSES[kind].pipeline_class
    state = {k: v.detach().contiguous() for k, v in state.items()}
    with atomic_file(path) as tmp:
        pipeline.save_lora_weights(save_directory=osp.dirname(tmp), weight_name=osp.basename(tmp),
                                   transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=config)
    return path


class DiTLoRATrainer(LoRATrainerBase):
    """Trains a transformer LoRA of an SD3.x or FLUX.1 recipe (module docstring). Built as
    ``DiTLoRATrainer``, it is the family's class of the recipe's model (``SD3LoRATrainer``,
    ``FluxLoRATrainer``), as the DiT source is.

    Args:
        cfg: the recipe (``configs/lora/_base_dit_.py``): ``model`` (an SD3.x or FLUX.1
            diffusers folder), ``image_dir``, ``work_dir``, ``num_images``, ``resolution``
            (multiple of 16), ``rank``, ``alpha``, ``target_modules`` (None: the family's
            :data:`DIT_TARGETS`), ``transformer_lr``, ``weight_decay``, ``max_grad_norm``,
            ``weighting_scheme`` (None: the family's), ``logit_mean``, ``logit_std``,
            ``mode_scale``, ``precondition_outputs``, ``guidance_scale`` (FLUX.1-dev),
            ``max_sequence_length`` (None: the pipeline's), ``steps``, ``batch_size``,
            ``save_every``, ``log_every``, ``caption``/``captions``, ``seed``.
        device: default CUDA when available.
        mixed_precision: 'auto' (bfloat16 on accelerators: FLUX overflows in float16), 'no',
            'fp16' or 'bf16': the frozen weights' dtype and autocast; the LoRA weights stay
            float32.
        gradient_checkpointing: recompute each block's activations in the backward pass.
    """

    kind: str  # the family's, set by its class
    # kind -> its family's trainer, filled as each is defined.
    families: Dict[str, type] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if 'kind' in cls.__dict__:
            DiTLoRATrainer.families[cls.kind] = cls

    def __new__(cls, cfg, *args, **kwargs):
        check_dit_recipe(cfg)
        family = DiTLoRATrainer.families[read_kind(cfg.model)]
        if cls is not DiTLoRATrainer and not issubclass(cls, family):
            raise ValueError(f"'{cfg.model}' holds a {family.kind} pipeline: train it with "
                             f'{family.__name__} (or DiTLoRATrainer), not {cls.__name__}.')
        return super().__new__(family if cls is DiTLoRATrainer else cls)

    check_recipe = staticmethod(check_dit_recipe)

    @staticmethod
    def frozen_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
        """'auto': bfloat16 on accelerators (diffusers' scripts' advice; FLUX's activations
        overflow float16), float32 on the CPU."""
        if mixed_precision == 'auto' and torch.device(device).type != 'cpu':
            return torch.bfloat16
        return resolve_dtype(mixed_precision, device, 'mixed_precision')

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def target_modules(self) -> Sequence[str]:
        return list(self.cfg.get('target_modules') or DIT_TARGETS[self.kind])

    @property
    def weighting_scheme(self) -> str:
        return self.cfg.get('weighting_scheme') or DEFAULT_WEIGHTING[self.kind]

    # What each family does its own way.

    def tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """The transformer's image input (and the layout the loss is taken in)."""
        return latents

    @abstractmethod
    def patch_size(self) -> int:
        """Latent pixels per token side."""

    @abstractmethod
    def family_inputs(self, inputs: Dict, sigmas: torch.Tensor, grid) -> Dict:
        """``inputs`` completed with the family's timestep and what else its transformer
        takes; ``sigmas`` (B,), ``grid`` the latents' (h, w)."""

    # The family-independent rest.

    def _prepare(self) -> None:
        from diffusers import AutoencoderKL
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig
        cfg, device, family = self.cfg, self.device, FAMILY_CLASSES[self.kind]
        torch.manual_seed(cfg.seed)  # the LoRA's initialisation
        load_dtype = None if self.dtype == torch.float32 else self.dtype
        self.scheduler = load_scheduler(cfg.model)
        # The images once, in float32 (the posterior's mode, as the sources read them).
        vae = load_weights(AutoencoderKL, cfg.model, 'vae', GET_DIT_HINT).to(device).eval()
        drop_vae_decoder(vae)
        self._encode_images(vae)
        del vae
        # The captions once, before the transformer loads; the text encoders (T5-XXL: 9.5 GB
        # in bfloat16) are dropped after. They run on the CPU, as the DiT source's do.
        self._encode_captions(family, None if load_dtype is None else torch.bfloat16)
        self.transformer = load_weights(family.transformer_class, cfg.model, 'transformer',
                                        GET_DIT_HINT, **dtype_kwargs(load_dtype)).to(device)
        patch = self.patch_size()
        if self.latents.shape[-1] % patch:
            raise ValueError(f'resolution {cfg.resolution} gives latents of '
                             f'{self.latents.shape[-1]} pixels, not a multiple of the '
                             f"transformer's {patch}x{patch} patches.")
        self.transformer.requires_grad_(False)
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights='gaussian',
                            target_modules=list(self.target_modules))
        try:
            self.transformer.add_adapter(config)
        except ValueError as err:  # peft: "Target modules ... not found in the base model"
            raise ValueError(f'target_modules {list(self.target_modules)} name no layer of '
                             f"this {self.kind} transformer ({err}).") from err
        cast_training_params(self.transformer, dtype=torch.float32)
        if self.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.transformer_lr,
                                           weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def _encode_captions(self, family, dtype: Optional[torch.dtype]) -> None:
        """Each distinct caption through the pipeline's own ``encode_prompt`` (the DiT
        source's family hook): ``text`` holds the per-caption inputs stacked (those of
        ``BATCHED``) and the shared ones (FLUX's text ids), ``caption_index`` each image's."""
        encoded = family.encode_prompts(self.cfg.model, self.captions,
                                        self.cfg.get('max_sequence_length'), dtype,
                                        self.scheduler)
        unique, embeds = list(encoded), list(encoded.values())
        self.caption_index = torch.tensor([unique.index(c) for c in self.captions])
        self.text = {}
        for key, value in embeds[0].items():
            if key in BATCHED:
                shapes = {tuple(e[key].shape) for e in embeds}
                if len(shapes) > 1:
                    raise ValueError(f'The captions encode to different lengths ({shapes}); '
                                     'set max_sequence_length.')
                value = torch.cat([e[key] for e in embeds])
            self.text[key] = value.float().to(self.device)

    def _step(self, step: int) -> float:
        from diffusers.training_utils import (compute_density_for_timestep_sampling,
                                              compute_loss_weighting_for_sd3)
        cfg, device = self.cfg, self.device
        index, x0 = self._sample_batch()
        noise = torch.randn(x0.shape, generator=self.generator).to(device)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme, batch_size=len(x0),
            logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
            generator=self.generator)
        steps = (u * self.scheduler.config.num_train_timesteps).long()
        sigmas = self.scheduler.sigmas[steps].to(device)
        timesteps = self.scheduler.timesteps[steps].to(device)
        sigma = sigmas.view(-1, *[1] * (x0.ndim - 1))
        noisy = (1 - sigma) * x0 + sigma * noise
        inputs = {key: value[self.caption_index[index]] if key in BATCHED else value
                  for key, value in self.text.items()}
        inputs = self.family_inputs(dict(inputs, hidden_states=self.tokens(noisy),
                                         timestep=timesteps), sigmas, x0.shape[-2:])
        inputs.update({k: inputs[k].to(self.dtype) for k in FROZEN_DTYPE_INPUTS})
        with self._autocast():
            pred = self.transformer(**inputs, return_dict=False)[0].float()
        sigma = sigmas.view(-1, *[1] * (pred.ndim - 1))
        if cfg.get('precondition_outputs'):  # the SD3 script's default: compare x0
            pred, target = pred * -sigma + self.tokens(noisy), self.tokens(x0)
        else:
            target = self.tokens(noise - x0)
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigma).float()
        loss = (weighting * (pred - target.float())**2).reshape(len(x0), -1).mean(1).mean()
        self._optimize(loss, cfg.get('max_grad_norm'))
        return loss.item()

    def lora_models(self) -> Dict[str, torch.nn.Module]:
        return {'transformer': self.transformer}

    def _trained(self) -> str:
        return f'{self.kind} transformer'

    def _resume_settings(self) -> dict:
        """Everything but the length and intervals; images and captions by name and text, so
        a dataset moved elsewhere still resumes."""
        cfg = self.cfg
        return dict(model=cfg.model, kind=self.kind,
                    images=[osp.basename(p) for p in self.paths], captions=self.captions,
                    resolution=cfg.resolution, rank=cfg.rank, alpha=cfg.alpha,
                    target_modules=list(self.target_modules),
                    transformer_lr=cfg.transformer_lr, weight_decay=cfg.weight_decay,
                    max_grad_norm=cfg.get('max_grad_norm'),
                    weighting_scheme=self.weighting_scheme, logit_mean=cfg.logit_mean,
                    logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
                    precondition_outputs=bool(cfg.get('precondition_outputs')),
                    guidance_scale=cfg.guidance_scale,
                    max_sequence_length=cfg.get('max_sequence_length'),
                    batch_size=cfg.batch_size, seed=cfg.seed,
                    frozen_dtype=str(self.dtype).replace('torch.', ''))

    def _save_lora(self, path: str) -> None:
        from peft import get_peft_model_state_dict
        write_dit_lora(path, self.kind, get_peft_model_state_dict(self.transformer),
                       self.transformer.peft_config['default'].to_dict())


class SD3LoRATrainer(DiTLoRATrainer):
    """SD3.x: latents as they are, the timestep on the 0-1000 scale, CLIP-L/G + T5 text."""

    kind = 'sd3'

    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    def family_inputs(self, inputs: Dict, sigmas: torch.Tensor, grid) -> Dict:
        return inputs


class FluxLoRATrainer(DiTLoRATrainer):
    """FLUX.1: packed latents with position ids, the timestep in [0, 1], the guidance
    embedding's value (FLUX.1-dev; schnell has none)."""

    kind = 'flux'

    def tokens(self, latents: torch.Tensor) -> torch.Tensor:
        return pack_latents(latents)

    def patch_size(self) -> int:
        return 2

    def family_inputs(self, inputs: Dict, sigmas: torch.Tensor, grid) -> Dict:
        n = len(sigmas)
        inputs.update(timestep=inputs['timestep'] / 1000,
                      img_ids=image_ids(grid[0] // 2, grid[1] // 2).to(self.device))
        if self.transformer.config.guidance_embeds:
            inputs['guidance'] = torch.full((n, ), float(self.cfg.guidance_scale),
                                            device=self.device)
        return inputs


def make_lora_trainer(cfg, device: Optional[torch.device] = None,
                      mixed_precision: str = 'auto', gradient_checkpointing: bool = False
                      ) -> LoRATrainerBase:
    """The trainer of a recipe, by its model's pipeline: :class:`DiTLoRATrainer` for SD3.x
    and FLUX.1 folders, :class:`LoRATrainer` (UNet) for the others; by the recipe's kind
    (a DiT recipe has ``transformer_lr``) where the model cannot be read, so that its own
    loader names the problem."""
    name = pipeline_name(cfg.get('model', ''))
    dit = name in KINDS if name is not None else 'transformer_lr' in cfg
    return (DiTLoRATrainer if dit else LoRATrainer)(cfg, device, mixed_precision,
                                                    gradient_checkpointing)
