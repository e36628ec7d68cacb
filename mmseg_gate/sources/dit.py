"""Diffusion-transformer features: Stable Diffusion 3.x (``SD3Transformer2DModel``) and FLUX.1
(``FluxTransformer2DModel``) as frozen sources.

Each variant is a prompt, optionally with a LoRA (``loras=dict(name=file)``, a variant's
``lora='name'`` and ``lora_scale``: diffusers' DiT LoRA files, loaded as peft adapters with
every tensor of the file counted; each variant's pass runs with its adapter alone) and, on
SD3, ControlNets (``controlnets=dict(canny=dict(model=..., condition=...))``, a variant's
``controlnets=dict(canny=1.0)``): ``SD3ControlNetModel`` on the condition's VAE latent
(the posterior mode; shift and pooled projection as the SD3 ControlNet pipeline treats each
kind),
its block residuals handed to the transformer's forward, which adds each after its block
(a tapped block's own output is read before its residual: the residual shows from the next
block on); on FLUX, ``FluxControlNetModel`` (InstantX's kind: the packed condition latent,
double- and single-stream residuals). XLabs' FLUX ControlNets (a hint block), union
ControlNets (modes) and SD3.5 ControlNets with extra conditioning channels are not supported
yet: asking for one is an error.

A call encodes the image once with the VAE (shift and scale as the pipelines do), noises it
as the pipelines' img2img does -- ``timestep`` t of 1,000 is img2img at ``strength = t /
1000`` over 1,000 scheduler steps: the scheduler's shift (SD3's fixed
shift, FLUX's resolution-dependent ``mu``) decides the sigma, ``scale_noise`` mixes the noise
in -- and runs diffusers' own transformer forward, stopped right after the last tapped block
(the blocks after it are freed). A tap is a block, ``'transformer_blocks.<i>'`` (SD3's joint
blocks, FLUX's double-stream blocks) or ``'single_transformer_blocks.<i>'`` (FLUX); its image
tokens come back as an (N, C, h, w) map at the patch stride (16 input pixels for both); its
text tokens are not a map and are never returned. Prompts are encoded once, by the
pipelines' own ``encode_prompt`` (CLIP-L/G and T5 for SD3, CLIP-L and T5 for FLUX, prompts of
any length as they encode them); the text encoders are dropped afterwards. FLUX's latents are
packed 2x2 into tokens with their position ids, and its guidance embedding gets
``guidance_scale`` (FLUX.1-dev; FLUX.1-schnell has none).
"""
import math
import os.path as osp
from collections import Counter
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from diffusers import (AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler,
                       FluxControlNetModel, FluxPipeline, FluxTransformer2DModel,
                       SD3ControlNetModel, SD3Transformer2DModel, StableDiffusion3Pipeline)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors.torch import load_file
from transformers import (CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                          T5EncoderModel, T5TokenizerFast)

from ..engine.devices import resolve_dtype
from .base import (SOURCES, FeatureSource, Features, check_images, input_stride, move_frozen,
                   rescaled)
from .stable_diffusion.conditions import ConditionDetector
from .stable_diffusion.latents import draw_noise, encode_latents
from .stable_diffusion.loading import drop_vae_decoder, load_weights
from .stable_diffusion.lora import activate_adapter, check_lora_landed
from .stable_diffusion.source import pad_to_multiple
from .stable_diffusion.unet_taps import StopForward

KINDS = dict(StableDiffusion3Pipeline='sd3', FluxPipeline='flux')
_GET_DIT = ('Get a model in diffusers format, e.g. `hf download '
            'stabilityai/stable-diffusion-3.5-medium --local-dir checkpoints/sd35 --include '
            '"*.json" "*.txt" "*.model" "*.safetensors" --exclude "*.fp16.*"` (or '
            "black-forest-labs/FLUX.1-dev), and set the source's `model`.")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's token layout: (N, C, H, W) latents as (N, H/2 * W/2, 4C) tokens, each 2x2 patch
    one token (row-major)."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def image_ids(height: int, width: int) -> torch.Tensor:
    """FLUX's position ids of (height x width) image tokens: (0, row, column) each."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


@SOURCES.register_module()
class DiTSource(FeatureSource):
    """SD3.x or FLUX.1 transformer features per variant (prompt, LoRA, ControlNets; module
    docstring).

    Args:
        model (str): a diffusers folder (or hub id) of a ``StableDiffusion3Pipeline`` or
            ``FluxPipeline``.
        prompt (str): the default prompt of every variant. Default: ''.
        variants (Sequence[dict], optional): ``dict(prompt=..., lora=None, lora_scale=1.0,
            controlnets=dict(name=scale))`` per variant. Default: one.
        loras (dict, optional): name -> LoRA safetensors file of this transformer (diffusers'
            format, ``transformer.*`` keys, as ``save_lora_weights`` writes).
        controlnets (dict, optional): name -> ``dict(model=folder or hub id,
            condition=dict(type='canny'))`` (``SD3ControlNetModel`` / ``FluxControlNetModel``
            weights).
        taps (Sequence[str]): blocks to read. Default: SD3 the middle joint block; FLUX the
            last double-stream block.
        timestep (int): noise level of 1,000 (img2img strength t / 1000; 0: the clean
            latent). Default: 50.
        guidance_scale (float): FLUX's guidance embedding (models that have one).
            Default: 3.5.
        max_sequence_length (int, optional): T5 tokens (the pipelines' default: SD3 256,
            FLUX 512).
        input_scale (float): the model sees the input resized by this factor. Default: 1.
        frozen_dtype (str): 'auto' (float16 on accelerators; bfloat16 suits FLUX), 'float32',
            'float16' or 'bfloat16'. Default: 'auto'.
        noise_seed (int): seed of the noise when a call passes no generator. Default: 0.
    """

    def __init__(self, model: str, prompt: str = '', variants: Optional[Sequence[dict]] = None,
                 loras: Optional[Dict[str, str]] = None,
                 controlnets: Optional[Dict[str, dict]] = None,
                 taps: Optional[Sequence[str]] = None, timestep: int = 50,
                 guidance_scale: float = 3.5, max_sequence_length: Optional[int] = None,
                 input_scale: float = 1.0, frozen_dtype: str = 'auto', noise_seed: int = 0):
        resolve_dtype(frozen_dtype, torch.device('cpu'))
        variants = [dict(v) for v in (variants or [dict()])]
        loras, controlnets = dict(loras or {}), dict(controlnets or {})
        for i, variant in enumerate(variants):
            extra = sorted(set(variant) - {'prompt', 'lora', 'lora_scale', 'controlnets'})
            if extra:
                raise ValueError(f'DiTSource variant {i}: {extra} are not supported on '
                                 'diffusion transformers yet (prompts, LoRAs, ControlNets).')
            unknown = sorted(set(variant.get('controlnets') or {}) - set(controlnets))
            if unknown:
                raise ValueError(f'DiTSource variant {i}: ControlNets {unknown} are not in '
                                 f'`controlnets` ({sorted(controlnets)}).')
            if variant.get('lora') is not None and variant['lora'] not in loras:
                raise ValueError(f"DiTSource variant {i}: LoRA {variant['lora']!r} is not one "
                                 f'of the `loras` ({sorted(loras)}).')
        self.prompts = [v.get('prompt', prompt) for v in variants]
        self.variant_loras = [v.get('lora') for v in variants]
        self.variant_controlnets = [dict(v.get('controlnets') or {}) for v in variants]
        self.lora_scales = {v['lora']: v.get('lora_scale', 1.0) for v in variants
                            if v.get('lora') is not None}
        self.timestep = self._checked(timestep)
        try:
            index = DiffusionPipeline.load_config(model)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"'{model}' is not a diffusers pipeline folder ({err}). "
                                    f'{_GET_DIT}') from err
        self.kind = KINDS.get(index.get('_class_name'))
        if self.kind is None:
            raise ValueError(f"'{model}' holds a {index.get('_class_name')}; DiTSource reads "
                             f'{sorted(KINDS)}.')
        self.model_name = model
        transformer_class = SD3Transformer2DModel if self.kind == 'sd3' \
            else FluxTransformer2DModel
        self.transformer = load_weights(transformer_class, model, 'transformer', _GET_DIT)
        self.vae = load_weights(AutoencoderKL, model, 'vae', _GET_DIT)
        drop_vae_decoder(self.vae)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            model, subfolder='scheduler')
        controlnet_class = SD3ControlNetModel if self.kind == 'sd3' else FluxControlNetModel
        self.controlnets = {name: load_weights(controlnet_class, cfg['model'], None, _GET_DIT)
                            for name, cfg in controlnets.items()}
        for name, net in self.controlnets.items():
            unsupported = ('extra conditioning channels (an SD3.5 ControlNet)'
                           if getattr(net.config, 'extra_conditioning_channels', 0) else
                           'a hint block (an XLabs ControlNet)'
                           if getattr(net, 'input_hint_block', None) is not None else
                           'modes (a union ControlNet)'
                           if getattr(net.config, 'num_mode', None) else None)
            if unsupported:
                raise ValueError(f"DiTSource: ControlNet '{name}' has {unsupported}; only "
                                 'ControlNets on the condition latent alone are supported '
                                 'yet.')
        self.detectors = {name: ConditionDetector(**cfg.get('condition', dict(type='canny')))
                          for name, cfg in controlnets.items()}
        self.embeddings = self._encode_prompts(model, max_sequence_length)
        for name in dict.fromkeys(n for n in self.variant_loras if n is not None):
            self._load_lora(name, loras[name])
        self.guidance_scale = guidance_scale
        names = self._block_names()
        double = len(self.transformer.transformer_blocks)
        self.taps = list(taps or [names[len(names) // 2] if self.kind == 'sd3'
                                  else f'transformer_blocks.{double - 1}'])
        for tap in self.taps:
            if tap not in names:
                raise KeyError(f"Tap '{tap}' is not a block of this transformer: taps are "
                               f'whole blocks ({names[0]} ... {names[-1]}), whose image tokens '
                               'come back as maps; text tokens are not a spatial map and '
                               'cannot be tapped.')
        self.last = max(names.index(t) for t in self.taps)
        self._free_after(names[self.last])
        self.vae_factor = 2**(len(self.vae.config.block_out_channels) - 1)
        self.patch = (self.transformer.config.patch_size if self.kind == 'sd3' else 2)
        self.input_scale = float(input_scale)
        self.stride = input_stride(self.vae_factor * self.patch, self.input_scale,
                                   'the transformer tokens')
        self.dtype_name, self.noise_seed = frozen_dtype, noise_seed
        self.device, self.dtype = torch.device('cpu'), torch.float32
        self.counts: Counter = Counter()
        width = self.transformer.config.num_attention_heads * \
            self.transformer.config.attention_head_dim
        self.feature_info = [dict(module=t, num_chs=width, reduction=self.stride,
                                  num_variants=len(self.prompts)) for t in self.taps]

    def _load_lora(self, name: str, path: str) -> None:
        """A LoRA file as adapter ``name`` of the transformer, every tensor counted."""
        if not osp.isfile(path):
            raise FileNotFoundError(f"LoRA file '{path}' does not exist.")
        state = {k: v for k, v in load_file(path).items() if k.startswith('transformer.')}
        if not state:
            raise ValueError(f"LoRA '{path}' holds no 'transformer.*' tensors: not a LoRA of "
                             'a diffusion transformer in diffusers\' format.')
        try:
            self.transformer.load_lora_adapter(state, prefix='transformer', adapter_name=name)
        except Exception as err:  # peft/diffusers errors do not name the file
            raise ValueError(f"LoRA '{path}' could not be loaded into the transformer "
                             f'({type(err).__name__}: {err}).') from err
        check_lora_landed(self.transformer, name, state, 'transformer', path)

    @staticmethod
    def _checked(timestep) -> int:
        if isinstance(timestep, bool) or not isinstance(timestep, int) or \
                not 0 <= timestep < 1000:
            raise ValueError(f'DiTSource timestep must be an integer in [0, 1000) (img2img '
                             f'strength t / 1000), got {timestep!r}.')
        return timestep

    def __repr__(self) -> str:
        return f'DiTSource({self.model_name!r}, {self.kind}, taps {self.taps})'

    @property
    def variant_names(self) -> List[str]:
        return [f'prompt {p!r}' + ''.join(f' + {name}' for name in nets)
                + (f' + lora {lora}' if lora else '')
                for p, lora, nets in zip(self.prompts, self.variant_loras,
                                         self.variant_controlnets)]

    def control_latents(self, name: str, pixels: torch.Tensor) -> torch.Tensor:
        """ControlNet ``name``'s condition of ``pixels`` as the SD3 ControlNet pipeline feeds
        it: the detector's map in [-1, 1], VAE-encoded (posterior mode), scaled, shifted
        unless the ControlNet is one that zeroes its pooled projection (InstantX's)."""
        cond = self.detectors[name](pixels.float()).to(self.device, self.dtype) * 2 - 1
        latent = self.vae.encode(cond).latent_dist.mode()
        if self.kind == 'flux':
            return pack_latents((latent - (self.vae.config.shift_factor or 0.0))
                                * self.vae.config.scaling_factor)
        shift = 0.0 if self.controlnets[name].config.force_zeros_for_pooled_projection \
            else (self.vae.config.shift_factor or 0.0)
        return (latent - shift) * self.vae.config.scaling_factor

    def _residuals(self, nets: Dict[str, float], inputs: Dict, conditions) -> Dict:
        """The transformer's ControlNet arguments for a variant's ControlNets (each
        ControlNet's residuals, summed over ControlNets as diffusers' multi-ControlNets do)."""
        total = None
        for name, scale in nets.items():
            net = self.controlnets[name]
            self.counts['controlnet_passes'] += inputs['hidden_states'].shape[0]
            if self.kind == 'sd3':
                pooled = inputs['pooled_projections']
                samples = [net(
                    hidden_states=inputs['hidden_states'], timestep=inputs['timestep'],
                    controlnet_cond=conditions[name], conditioning_scale=scale,
                    encoder_hidden_states=inputs['encoder_hidden_states']
                    if net.config.joint_attention_dim is not None else None,
                    pooled_projections=torch.zeros_like(pooled)
                    if net.config.force_zeros_for_pooled_projection else pooled,
                    return_dict=False)[0]]
            else:
                extra = {k: inputs[k] for k in ('hidden_states', 'timestep', 'img_ids',
                                                'txt_ids', 'pooled_projections',
                                                'encoder_hidden_states')}
                if net.config.guidance_embeds:
                    extra['guidance'] = torch.full_like(inputs['timestep'], self.guidance_scale)
                samples = list(net(controlnet_cond=conditions[name], conditioning_scale=scale,
                                   return_dict=False, **extra))
            total = samples if total is None else [
                None if a is None else [x + y for x, y in zip(a, b)]
                for a, b in zip(total, samples)]
        keys = ('block_controlnet_hidden_states', ) if self.kind == 'sd3' else \
            ('controlnet_block_samples', 'controlnet_single_block_samples')
        return dict(zip(keys, total))

    def check_timestep(self, timestep: Optional[int]) -> None:
        if timestep is not None:
            self._checked(timestep)

    def _block_names(self) -> List[str]:
        names = [f'transformer_blocks.{i}'
                 for i in range(len(self.transformer.transformer_blocks))]
        if self.kind == 'flux':
            names += [f'single_transformer_blocks.{i}'
                      for i in range(len(self.transformer.single_transformer_blocks))]
        return names

    def _free_after(self, last: str) -> None:
        """Blocks after the last tap never run: free them."""
        kind, index = last.rsplit('.', 1)
        blocks = getattr(self.transformer, kind)
        setattr(self.transformer, kind, torch.nn.ModuleList(list(blocks)[:int(index) + 1]))
        if kind == 'transformer_blocks' and self.kind == 'flux':
            self.transformer.single_transformer_blocks = torch.nn.ModuleList()

    def _encode_prompts(self, model: str, max_sequence_length: Optional[int]) -> Dict:
        """Each distinct prompt through the pipeline's own ``encode_prompt``; the text
        encoders are not kept."""
        if self.kind == 'sd3':
            parts = dict(text_encoder=load_weights(CLIPTextModelWithProjection, model,
                                                   'text_encoder', _GET_DIT),
                         text_encoder_2=load_weights(CLIPTextModelWithProjection, model,
                                                     'text_encoder_2', _GET_DIT),
                         text_encoder_3=load_weights(T5EncoderModel, model, 'text_encoder_3',
                                                     _GET_DIT),
                         tokenizer=CLIPTokenizer.from_pretrained(model, subfolder='tokenizer'),
                         tokenizer_2=CLIPTokenizer.from_pretrained(model,
                                                                   subfolder='tokenizer_2'),
                         tokenizer_3=T5TokenizerFast.from_pretrained(model,
                                                                     subfolder='tokenizer_3'))
            pipe = StableDiffusion3Pipeline(transformer=None, scheduler=self.scheduler,
                                            vae=None, **parts)
        else:
            parts = dict(text_encoder=load_weights(CLIPTextModel, model, 'text_encoder',
                                                   _GET_DIT),
                         text_encoder_2=load_weights(T5EncoderModel, model, 'text_encoder_2',
                                                     _GET_DIT),
                         tokenizer=CLIPTokenizer.from_pretrained(model, subfolder='tokenizer'),
                         tokenizer_2=T5TokenizerFast.from_pretrained(model,
                                                                     subfolder='tokenizer_2'))
            pipe = FluxPipeline(transformer=None, scheduler=self.scheduler, vae=None, **parts)
        length = dict(max_sequence_length=max_sequence_length) if max_sequence_length else {}
        embeddings = {}
        with torch.no_grad():
            for prompt in dict.fromkeys(self.prompts):
                if self.kind == 'sd3':
                    out = pipe.encode_prompt(prompt, prompt, prompt, device='cpu',
                                             do_classifier_free_guidance=False, **length)
                    embeddings[prompt] = dict(encoder_hidden_states=out[0],
                                              pooled_projections=out[2])
                else:
                    out = pipe.encode_prompt(prompt, prompt, device='cpu', **length)
                    embeddings[prompt] = dict(encoder_hidden_states=out[0],
                                              pooled_projections=out[1], txt_ids=out[2])
        del pipe, parts  # the text encoders are not needed again
        return embeddings

    def to(self, device) -> 'DiTSource':
        move_frozen(self, [self.transformer, self.vae, *self.controlnets.values()], device)
        return self

    def noise_timestep(self, timestep: int, image_seq_len: int) -> torch.Tensor:
        """The scheduler timestep img2img at strength t / 1000 (over 1,000 steps) starts
        from, with the scheduler's shift (FLUX: for ``image_seq_len`` tokens)."""
        steps = 1000
        if self.kind == 'flux':
            sigmas = np.linspace(1.0, 1 / steps, steps)
            cfg = self.scheduler.config
            mu = calculate_shift(image_seq_len, cfg.get('base_image_seq_len', 256),
                                 cfg.get('max_image_seq_len', 4096), cfg.get('base_shift', 0.5),
                                 cfg.get('max_shift', 1.15))
            self.scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        else:
            self.scheduler.set_timesteps(steps)
        start = int(max(steps - min(steps * timestep / 1000, steps), 0))
        return self.scheduler.timesteps[start:start + 1]

    @contextmanager
    def _reading(self, store: Dict[str, torch.Tensor]):
        """Forward hooks keeping the taps' image tokens; the last tapped block stops the
        pass."""
        modules = dict(self.transformer.named_modules())
        final = self._block_names()[self.last]

        def keep(name):
            def hook(_module, _inputs, output):
                store[name] = output[1]  # (text tokens, image tokens): the image stream
                if name == final:
                    raise StopForward
            return hook
        handles = [modules[t].register_forward_hook(keep(t)) for t in self.taps]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, timestep: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> List[Features]:
        check_images(images)
        timestep = self.timestep if timestep is None else self._checked(timestep)
        if generator is None:
            generator = torch.Generator().manual_seed(self.noise_seed)
        self.to(images.device)
        height, width = images.shape[-2:]
        pixels = pad_to_multiple(rescaled(images, self.input_scale),
                                 self.vae_factor * self.patch).to(self.device, self.dtype)
        self.counts['vae_encodes'] += images.shape[0]
        clean = encode_latents(self.vae, pixels)
        n, _, lh, lw = clean.shape
        grid = (lh // self.patch, lw // self.patch)
        if timestep == 0:
            latents, t = clean, torch.zeros(1)
        else:
            t = self.noise_timestep(timestep, grid[0] * grid[1])
            noise = draw_noise(clean.shape, generator).to(clean)
            self.counts['noise_samples'] += n
            latents = self.scheduler.scale_noise(clean, t, noise)
        used = dict.fromkeys(name for nets in self.variant_controlnets for name in nets)
        conditions = {name: self.control_latents(name, pixels) for name in used}
        if self.kind == 'flux':  # the same tokens and ids for every variant
            tokens = dict(hidden_states=pack_latents(latents),
                          img_ids=image_ids(*grid).to(self.device, self.dtype))
        else:
            tokens = dict(hidden_states=latents)
        outputs = []
        for prompt, lora, nets in zip(self.prompts, self.variant_loras,
                                      self.variant_controlnets):
            activate_adapter([self.transformer], lora, self.lora_scales)
            embed = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
                     for k, v in self.embeddings[prompt].items()}
            inputs = dict(encoder_hidden_states=embed['encoder_hidden_states'].expand(
                n, -1, -1), pooled_projections=embed['pooled_projections'].expand(n, -1),
                          timestep=t.to(self.device, self.dtype).expand(n), return_dict=False)
            inputs.update(tokens)
            if self.kind == 'flux':
                inputs.update(txt_ids=embed['txt_ids'].to(self.dtype),
                              timestep=inputs['timestep'] / 1000)
                if self.transformer.config.guidance_embeds:
                    inputs['guidance'] = torch.full((n, ), self.guidance_scale,
                                                    device=self.device, dtype=self.dtype)
            if nets:
                inputs.update(self._residuals(nets, inputs, conditions))
            store: Dict[str, torch.Tensor] = {}
            self.counts['transformer_passes'] += n
            with self._reading(store):
                try:
                    self.transformer(**inputs)
                except StopForward:
                    pass
            outputs.append({
                name: store[name].transpose(1, 2).reshape(n, -1, *grid)[
                    ..., :math.ceil(height / self.stride), :math.ceil(width / self.stride)]
                for name in self.taps})
        return outputs
