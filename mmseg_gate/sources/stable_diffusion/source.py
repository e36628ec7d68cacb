"""GATE's frozen half: guided Stable Diffusion features of images, as a feature source.

Every GATE task (segmentation, label-scarce segmentation, correspondence, the content-shift
guideline) needs the same thing: for each guided *variant* of an image (a prompt, optional
ControlNets, an optional LoRA, its own noise recipe), the activations of chosen UNet modules.
:class:`StableDiffusionSource` computes them, usable without MMSeg::

    from mmseg_gate import StableDiffusionSource
    source = StableDiffusionSource(model='checkpoints/sd15', prompt='a photo of a horse')
    feats = source(images)               # images: (N, 3, H, W) in [-1, 1], any size
    feats[0]['up_blocks.1.upsamplers.0']  # variant 0: (N, 1280, ceil(H / 16), ceil(W / 16))

Work is shared across variants (see :meth:`StableDiffusionSource._extract`): one VAE
encode per image, prompt embeddings encoded once at build time (then the text encoders are
dropped), one ControlNet pass per (ControlNet, prompt, latent, timestep) whatever the number of
variants using it, variants run as one UNet batch with a LoRA adapter chosen per sample (or on
fused UNet copies, ``lora_mode='fused'``), and each feature pass stops after the last tapped
block.
"""
import copy
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import DDIMScheduler

from ...engine.devices import resolve_dtype
from ..base import (SOURCES, Features, FeatureSource, check_ensemble_size, input_stride,
                    mean_over_draws, move_frozen, refuse_renamed)
from ..common.conditions import build_detectors
from ..common.latents import (Noise, draw_noise, encode_latents, ensemble_noise,
                              latent_scheduler, noised)
from ..common.lora import (BASE, activate_adapter, adapters_per_sample, load_lora_adapters,
                           load_text_encoder_loras)
from ..common.taps import UNetTaps
from ..common.timesteps import check_timesteps
from .attention_maps import CrossAttentionMaps
from .controlnets import load_controlnet
from .loading import DEFAULT_MODEL, load_stable_diffusion
from .prompts import PromptEmbedding, encode_prompt, sdxl_time_ids
from .variants import Variant, parse_variants

# The paper's segmentation features: the upsampler outputs of up blocks 0, 1 and 2
# (SD1.5 at 512x512: 1280 ch @ 1/32, 1280 ch @ 1/16, 640 ch @ 1/8).
DEFAULT_TAPS = ('up_blocks.0.upsamplers.0', 'up_blocks.1.upsamplers.0',
                'up_blocks.2.upsamplers.0')
# The name of the aggregated cross-attention maps among a variant's features.
ATTENTION_MAPS = 'cross_attention_maps'
_LORA_MODES = ('adapters', 'fused')


def class_names_text(class_names: Union[str, Sequence[str], None]) -> str:
    """The dataset's class names as prompt text ('ade20k' and the like: MMSeg's lists)."""
    if class_names is None:
        raise ValueError("append_class_names=True needs `class_names` (a list, or a dataset "
                         "name such as 'ade20k' or 'cityscapes').")
    if isinstance(class_names, str):
        from mmseg.utils import get_classes
        return ', '.join(get_classes(class_names))
    return ', '.join(class_names)


@SOURCES.register_module()
class StableDiffusionSource(FeatureSource):
    """Guided Stable Diffusion features per variant, for images in [-1, 1].

    Args:
        model (str): a local diffusers-format Stable Diffusion folder (SD1.x, SD2.x or
            SDXL) or a hub id. Default: ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
        prompt (str): text the UNet is conditioned on (any length); the default of every
            variant. Default: ''.
        class_names (str | Sequence[str], optional): the dataset's classes, or a dataset name
            known to ``mmseg.utils.get_classes`` ('ade20k', 'cityscapes', ...).
        append_class_names (bool): append the class names to every prompt (the paper's
            fine-grained prompts). Default: False.
        variants (Sequence[dict], optional): GATE's guided variants, each
            ``dict(prompt=None, controlnets=dict(name=scale), lora=None, lora_scale=1.0)``,
            each with its own ``timestep``, ``denoising_from`` and ``noise_seed`` if it sets
            them (see :mod:`.variants`). Default: one prompt-only variant.
        controlnets (dict, optional): name -> ``dict(model=folder or hub id,
            condition=dict(type='canny', low_threshold=100, high_threshold=200))``.
        loras (dict, optional): name -> LoRA safetensors file (diffusers/peft or kohya).
        taps (Sequence[str]): UNet submodule names to read: block outputs, or modules with
            token outputs (``...attn1``, ``...attn2.to_q``, ``...ff``), which come back as maps;
            empty with ``attention_maps``: the maps alone (the GATE authors' separate
            attention run for correspondence). Default: the upsamplers of up blocks 0, 1, 2.
        timestep (int): noise level of the features, of 1000 (0: the clean latent); the
            default of every variant. Default: 50.
        denoising_from (int, optional): start from noise at this higher timestep and denoise
            to ``timestep`` (DDIM, one step per timestep, each variant with its own guidance)
            before reading the features: the authors' label-scarce and correspondence recipe
            (60); the default of every variant. Default: None (noise added at ``timestep``
            directly).
        attention_maps (dict, optional): also return the aggregated cross-attention maps as
            feature ``'cross_attention_maps'``: ``dict(places=('up', ), strides=(32, 16),
            tokens=77)`` (see :class:`CrossAttentionMaps`). Default: None.
        frozen_dtype (str): 'auto' (float16 on accelerators, float32 on the CPU), 'float32',
            'float16' or 'bfloat16'. Default: 'auto'.
        batch_variants (bool): run the variants of an image as one UNet batch or one after
            another (less memory, same features). Default: True.
        lora_mode (str): 'adapters' (LoRAs as adapters on one UNet: least memory, LoRA layers
            computed in every pass) or 'fused' (one UNet copy per LoRA with the LoRA merged: no
            LoRA compute, one UNet of memory per LoRA). Default: 'adapters'.
        noise_seed (int): seed of the noise when a call passes no generator (variants with a
            ``noise_seed`` of their own always draw from it). Default: 0.
        variant_noise (str): 'shared': the variants without a ``noise_seed`` of their own share
            an image's noise draw (they differ by their guidance alone, and variants with the
            same ControlNet and prompt share its pass); 'independent': every variant draws its
            own (the authors' runs, one per variant, each with fresh noise; more ControlNet
            passes where variants share a ControlNet). Default: 'shared'.
        input_scale (float): the model sees the input resized by this factor (bilinear):
            2.0 gives SD1.5 512x512 from the label-scarce benchmark's 256x256 images, so
            that a second source (ADM) sees them unresampled. Strides are in input pixels.
            Default: 1.0.
        ensemble_size (int): noise draws averaged per image (DIFT's ensemble: its
            correspondence features average 8): each image's latent is encoded once and
            repeated, every copy noised by its own draw, the features averaged. Default: 1.

    Renamed arguments (refused, naming the new one): ``sd_model`` -> ``model``.
    """

    def __init__(self,
                 model: str = DEFAULT_MODEL,
                 prompt: str = '',
                 class_names: Union[str, Sequence[str], None] = None,
                 append_class_names: bool = False,
                 variants: Optional[Sequence[dict]] = None,
                 controlnets: Optional[Dict[str, dict]] = None,
                 loras: Optional[Dict[str, str]] = None,
                 taps: Sequence[str] = DEFAULT_TAPS,
                 timestep: int = 50,
                 denoising_from: Optional[int] = None,
                 attention_maps: Optional[dict] = None,
                 frozen_dtype: str = 'auto',
                 batch_variants: bool = True,
                 lora_mode: str = 'adapters',
                 noise_seed: int = 0,
                 variant_noise: str = 'shared',
                 input_scale: float = 1.0,
                 ensemble_size: int = 1,
                 **renamed):
        refuse_renamed('StableDiffusionSource', renamed, dict(sd_model='model'))
        if variant_noise not in ('shared', 'independent'):
            raise ValueError(f"variant_noise must be 'shared' or 'independent', got "
                             f'{variant_noise!r}.')
        self.variant_noise = variant_noise
        controlnets, loras = dict(controlnets or {}), dict(loras or {})
        self.timestep, self.denoising_from = check_timesteps(timestep, denoising_from, 1000)
        self.variants: List[Variant] = parse_variants(variants, prompt, list(controlnets),
                                                      list(loras), timestep, denoising_from)
        if append_class_names:
            names = class_names_text(class_names)
            self.variants = [replace(v, prompt=f'{v.prompt.rstrip()} {names}'.strip())
                             for v in self.variants]
        resolve_dtype(frozen_dtype, torch.device('cpu'))  # validate before loading
        if lora_mode not in _LORA_MODES:
            raise ValueError(f'lora_mode must be one of {_LORA_MODES}, got {lora_mode!r}.')
        parts = load_stable_diffusion(model)
        self.num_steps = parts.scheduler.config.num_train_timesteps
        for i, v in enumerate(self.variants):  # against this model's schedule
            check_timesteps(v.timestep, v.denoising_from, self.num_steps, f'Variant {i}: ')
        self.model, self.is_sdxl = model, parts.is_sdxl
        self.vae, self.scheduler = parts.vae, parts.scheduler
        self.controlnets = {name: load_controlnet(cfg['model'], parts.unet)
                            for name, cfg in controlnets.items()}
        self.detectors = build_detectors(controlnets)
        self.lora_mode = lora_mode
        wanted = {v.adapter: (loras[v.lora], v.lora_scale) for v in self.variants
                  if v.lora is not None}
        self.unets, lora_files = self._prepare_unets(parts.unet, wanted)
        # A variant's prompt is encoded with its LoRA's text-encoder part, if the file has one.
        self.text_adapters = load_text_encoder_loras(parts.text_encoders, lora_files, wanted)
        self.prompt_embeds: Dict[Tuple[str, Optional[str]], PromptEmbedding] = {
            key: _encode_with_adapter(parts, *key, self.text_adapters)
            for key in dict.fromkeys(self.embedding_key(v) for v in self.variants)}
        for module in self._modules():
            module.requires_grad_(False).eval()
        self.attention = {key: CrossAttentionMaps(unet, **attention_maps)
                          for key, unet in self.unets.items()} if attention_maps else {}
        also_run = list(next(iter(self.attention.values())).layers) if self.attention else []
        self.taps = {key: UNetTaps(unet, taps, also_run) for key, unet in self.unets.items()}
        # Without denoising, only feature passes run: free what they never reach.
        denoises = any(v.denoising_from is not None for v in self.variants)
        self.dropped_stages = [] if denoises else self.prune_after_last_tap()
        self.vae_factor = 2**(len(self.vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_factor * 2**parts.unet.num_upsamplers
        self.dtype_name, self.batch_variants, self.noise_seed = (frozen_dtype, batch_variants,
                                                                 noise_seed)
        self.input_scale = float(input_scale)
        self.ensemble_size = check_ensemble_size(ensemble_size, 'StableDiffusionSource')
        self.device, self.dtype = torch.device('cpu'), self.vae.dtype
        self.counts: Counter = Counter()
        self.feature_info = self._probe()

    def __repr__(self) -> str:
        features = [(f['module'], f['num_chs'], f['reduction']) for f in self.feature_info]
        return (f'StableDiffusionSource({self.model!r}, {len(self.variants)} variant(s), '
                f'features {features})')

    @property
    def variant_names(self) -> List[str]:
        return [v.summary for v in self.variants]

    def check_timestep(self, timestep: Optional[int]) -> None:
        self.noise_plan(timestep)

    @property
    def unet(self):
        """The base UNet (with the LoRA adapters in 'adapters' mode). Without
        ``denoising_from`` its stages after the last tap are freed (``dropped_stages``)."""
        return self.unets[None]

    @property
    def stages_run(self) -> List[str]:
        return self.taps[None].stages_run

    def _prepare_unets(self, unet, wanted: Dict[str, Tuple[str, float]]):
        """{None: the base UNet} plus, in 'fused' mode, {adapter: UNet copy with it merged};
        and the LoRA files read."""
        if self.lora_mode == 'adapters':
            files = load_lora_adapters(unet, {a: p for a, (p, _) in wanted.items()},
                                       {a: s for a, (_, s) in wanted.items()})
            return {None: unet}, files
        unets, files = {None: unet}, {}
        for adapter, (path, scale) in wanted.items():
            fused = copy.deepcopy(unet)
            files.update(load_lora_adapters(fused, {adapter: path}, {adapter: scale}))
            fused.fuse_lora(adapter_names=[adapter])
            fused.unload_lora()
            unets[adapter] = fused
        return unets, files

    def embedding_key(self, variant: Variant) -> Tuple[str, Optional[str]]:
        """(prompt, text-encoder LoRA adapter or None): what a variant's prompt embedding
        depends on."""
        return variant.prompt, variant.adapter if variant.adapter in self.text_adapters \
            else None

    def embedding(self, variant: Union[int, Variant]) -> PromptEmbedding:
        """The prompt embedding a variant (or its index) conditions the UNet on."""
        if isinstance(variant, int):
            variant = self.variants[variant]
        return self.prompt_embeds[self.embedding_key(variant)]

    def prune_after_last_tap(self) -> List[str]:
        """The stages after the last tap and the output head, in every UNet copy."""
        return [t.prune_after_last_tap() for t in self.taps.values()][0]

    def _modules(self):
        return [self.vae, *self.unets.values(), *self.controlnets.values()]

    def to(self, device: Union[str, torch.device]) -> 'StableDiffusionSource':
        """Move to ``device`` in the dtype chosen for it (:func:`move_frozen`), the prompt
        embeddings with the weights; a no-op when already there."""
        before = (self.device, self.dtype)
        move_frozen(self, self._modules(), device)
        if (self.device, self.dtype) != before:
            self.prompt_embeds = {p: e.to(device=self.device, dtype=self.dtype)
                                  for p, e in self.prompt_embeds.items()}
        return self

    # -- extraction ------------------------------------------------------------------------

    def noise_plan(self, timestep: Optional[int] = None, variant: int = 0
                   ) -> Tuple[int, Optional[int]]:
        """(feature timestep, timestep the noise is added at) of ``variant`` in a call.

        ``None`` is the variant's recipe. t = 0 is the clean latent (no noise, the UNet
        conditioned on t = 0). With a ``denoising_from``, a timestep below it is reached by
        guided denoising from there, as the recipe does; any other timestep gets its noise
        added directly. The start is None for the clean latent."""
        recipe = self.variants[variant]
        timestep = recipe.timestep if timestep is None else \
            check_timesteps(timestep, None, self.num_steps)[0]
        if timestep == 0:
            return 0, None
        if recipe.denoising_from is not None and timestep < recipe.denoising_from:
            return timestep, recipe.denoising_from
        return timestep, timestep

    def _extract(self, pixels: torch.Tensor, timestep: Optional[int],
                 generator: Optional[Noise]) -> List[Features]:
        """Features per variant for images in [-1, 1] whose sides are multiples of
        ``size_multiple``, at ``timestep`` (:meth:`noise_plan`). ``generator`` draws the noise
        of the variants without a ``noise_seed`` of their own (default: one seeded with
        ``noise_seed``): a ``torch.Generator`` for the whole batch, or a ``PerImageNoise``
        (each image's own, also for the variants with a ``noise_seed``).

        Shared wherever recipes agree: one VAE encode; one noise per noise source (the call's
        generator, or a variant's ``noise_seed``); one noised latent per (noise, start); one
        ControlNet pass per (ControlNet, prompt, latent, timestep); one UNet batch per
        (timestep, UNet, prompt length); denoising per (start, timestep)."""
        if generator is None:
            generator = torch.Generator().manual_seed(self.noise_seed)
        plans = [self.noise_plan(timestep, i) for i in range(len(self.variants))]
        self.counts['vae_encodes'] += pixels.shape[0]
        clean = encode_latents(self.vae, pixels)
        used = dict.fromkeys(name for v in self.variants for name, _ in v.controlnets)
        conditions = {name: self.detectors[name](pixels).to(self.dtype) for name in used}
        time_ids = self.time_ids(pixels)
        draws = self.ensemble_size  # each image's latent repeated, one noise draw each
        if draws > 1:
            clean = clean.repeat_interleave(draws, 0)
            conditions = {k: c.repeat_interleave(draws, 0) for k, c in conditions.items()}
            time_ids = None if time_ids is None else time_ids.repeat_interleave(draws, 0)
            generator = ensemble_noise(generator, draws)
        noises, noisy, latents = {}, {}, []
        for index, (variant, (_, start)) in enumerate(zip(self.variants, plans)):
            if start is None:
                latents.append(clean)
                continue
            seed = variant.noise_seed
            key = (seed, index if self.variant_noise == 'independent' else None)
            if key not in noises:
                self.counts['noise_samples'] += clean.shape[0]
                noises[key] = draw_noise(clean.shape, generator, seed, stream=key[1])
            if (key, start) not in noisy:
                noisy[key, start] = noised(self.scheduler, clean, start, noises[key])
            latents.append(noisy[key, start])  # one tensor: its ControlNet pass is shared
        for (end, start), indices in _by_key(plans, lambda p: p if p[1] is not None else None):
            if start > end:
                latents = self._denoise(latents, indices, conditions, time_ids, start, end)
        feats = self._features(latents, [t for t, _ in plans], conditions, time_ids)
        return [{name: mean_over_draws(f, draws) for name, f in variant.items()}
                for variant in feats]

    def _groups(self, indices: Sequence[int]) -> List[Tuple[Optional[str], List[int]]]:
        """Variants of ``indices`` that run as one UNet batch: same UNet, same prompt
        length."""
        groups = defaultdict(list)
        for i in indices:
            variant = self.variants[i]
            unet_key = variant.adapter if self.lora_mode == 'fused' else None
            key = (unet_key, self.embedding(variant).hidden.shape[1])
            groups[key + (() if self.batch_variants else (i, ))].append(i)
        return [(key[0], members) for key, members in groups.items()]

    def _inputs(self, indices: List[int], latents: List[torch.Tensor], timestep: int,
                conditions: dict, time_ids: Optional[torch.Tensor], cache: dict):
        """UNet batch inputs for ``indices``: sample, context, ControlNet residuals, SDXL's
        added conditions."""
        num = latents[0].shape[0]
        embeds = [self.embedding(i) for i in indices]
        sample = torch.cat([latents[i] for i in indices])
        context = torch.cat([e.hidden.expand(num, -1, -1) for e in embeds])
        added = None
        if self.is_sdxl:
            added = dict(text_embeds=torch.cat([e.pooled.expand(num, -1) for e in embeds]),
                         time_ids=time_ids.repeat(len(indices), 1))
        down, mid = self._residuals(indices, latents, timestep, conditions, time_ids, cache)
        return sample, context, down, mid, added

    def _residuals(self, indices, latents, timestep, conditions, time_ids, cache):
        """Each variant's scaled sum of ControlNet residuals (zeros for none), concatenated;
        each (ControlNet, prompt, latent) is run once and shared by the variants using it."""
        if not any(self.variants[i].controlnets for i in indices):
            return None, None
        sums = []
        for i in indices:
            variant, down, mid = self.variants[i], None, None
            for name, scale in variant.controlnets:
                key = (name, self.embedding_key(variant), id(latents[i]), timestep)
                if key not in cache:
                    cache[key] = self._controlnet(name, self.embedding(variant), latents[i],
                                                  timestep, conditions[name], time_ids)
                res_down, res_mid = cache[key]
                if scale != 1.0:
                    res_down, res_mid = [scale * r for r in res_down], scale * res_mid
                down = res_down if down is None else [d + r for d, r in zip(down, res_down)]
                mid = res_mid if mid is None else mid + res_mid
            sums.append((down, mid))
        like = next(s for s in sums if s[0] is not None)
        sums = [s if s[0] is not None else
                ([torch.zeros_like(r) for r in like[0]], torch.zeros_like(like[1]))
                for s in sums]
        return ([torch.cat(level) for level in zip(*(s[0] for s in sums))],
                torch.cat([s[1] for s in sums]))

    def _controlnet(self, name, embed, latents, timestep, condition, time_ids):
        self.counts['controlnet_passes'] += latents.shape[0]
        num = latents.shape[0]
        kwargs = {}
        if self.is_sdxl:
            kwargs['added_cond_kwargs'] = dict(text_embeds=embed.pooled.expand(num, -1),
                                               time_ids=time_ids)
        down, mid = self.controlnets[name](latents, timestep, embed.hidden.expand(num, -1, -1),
                                           controlnet_cond=condition, conditioning_scale=1.0,
                                           return_dict=False, **kwargs)
        return list(down), mid

    def _adapters(self, unet_key: Optional[str], names: List[str]):
        """Within the block, sample i of a batch uses LoRA adapter ``names[i]`` (adapters
        mode with any LoRA; a no-op otherwise)."""
        if self.lora_mode != 'adapters' or not any(v.lora for v in self.variants):
            return nullcontext()
        return adapters_per_sample(self.unets[unet_key], names)

    def _adapter_names(self, indices: List[int], num: int) -> List[str]:
        """Per-sample adapters of a batch of ``num`` images per variant of ``indices``."""
        return [self.variants[i].adapter or BASE for i in indices for _ in range(num)]

    def _features(self, latents: List[torch.Tensor], timesteps: List[int],
                  conditions: dict, time_ids: Optional[torch.Tensor]) -> List[Features]:
        """One truncated, guided UNet pass per group of variants at the same timestep."""
        feats: List[Optional[Features]] = [None] * len(self.variants)
        num, cache = latents[0].shape[0], {}
        for timestep, same_t in _by_key(timesteps, lambda t: t):
            for unet_key, indices in self._groups(same_t):
                sample, context, down, mid, added = self._inputs(indices, latents, timestep,
                                                                 conditions, time_ids, cache)
                self.counts['unet_passes'] += num * len(indices)
                attention = self.attention.get(unet_key)
                with self._adapters(unet_key, self._adapter_names(indices, num)), \
                        (attention.recording() if attention else nullcontext()):
                    out = self.taps[unet_key](sample, timestep, context, down, mid, added)
                    if attention:
                        out[ATTENTION_MAPS] = attention.aggregate(tuple(sample.shape[-2:]))
                for j, i in enumerate(indices):
                    feats[i] = {name: f[j * num:(j + 1) * num] for name, f in out.items()}
        return feats

    def _denoise(self, latents: List[torch.Tensor], indices: List[int], conditions: dict,
                 time_ids: Optional[torch.Tensor], start: int, end: int
                 ) -> List[torch.Tensor]:
        """DDIM from ``start`` down to ``end`` for the variants ``indices``, one step per
        timestep, each with its own prompt, ControlNets and LoRA (full UNet passes)."""
        scheduler = latent_scheduler(DDIMScheduler, self.scheduler.config)
        scheduler.set_timesteps(scheduler.config.num_train_timesteps)
        num = latents[0].shape[0]
        for timestep in range(start, end, -1):
            stepped, cache = list(latents), {}
            for unet_key, group in self._groups(indices):
                sample, context, down, mid, added = self._inputs(group, latents, timestep,
                                                                 conditions, time_ids, cache)
                self.counts['denoising_passes'] += num * len(group)
                with self._adapters(unet_key, self._adapter_names(group, num)):
                    pred = self.unets[unet_key](
                        sample, timestep, context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, added_cond_kwargs=added).sample
                for j, i in enumerate(group):
                    stepped[i] = scheduler.step(pred[j * num:(j + 1) * num], timestep,
                                                latents[i]).prev_sample.to(self.dtype)
            latents = stepped
        return latents

    def time_ids(self, pixels: torch.Tensor) -> Optional[torch.Tensor]:
        """SDXL's size conditioning of ``pixels`` (None for SD1.x/2.x)."""
        if not self.is_sdxl:
            return None
        return sdxl_time_ids(*pixels.shape[-2:], pixels.shape[0], self.dtype, pixels.device)

    def added_conditions(self, embed: PromptEmbedding, latents: torch.Tensor
                         ) -> Optional[dict]:
        """SDXL's added conditions (pooled prompt, size ids) for a batch of ``latents`` with
        one prompt; None for SD1.x/2.x."""
        if not self.is_sdxl:
            return None
        num = latents.shape[0]
        height, width = (s * self.vae_factor for s in latents.shape[-2:])
        return dict(text_embeds=embed.pooled.expand(num, -1),
                    time_ids=sdxl_time_ids(height, width, num, self.dtype, latents.device))

    @torch.no_grad()
    def plain_pass(self, latents: torch.Tensor, timestep: Optional[int] = None) -> Features:
        """The truncated UNet pass on ``latents`` with the first variant's prompt and the
        base weights (no ControlNet, no LoRA): the unit the cost figures count."""
        num, embed = latents.shape[0], self.embedding(0)
        with self._adapters(None, [BASE] * num):
            return self.taps[None](latents, self.timestep if timestep is None else timestep,
                                   embed.hidden.expand(num, -1, -1),
                                   added_cond_kwargs=self.added_conditions(embed, latents))

    @torch.no_grad()
    def _probe(self) -> List[dict]:
        """module, num_chs, reduction (and num_variants) of each feature, from one small
        pass of the first variant."""
        size = self.size_multiple
        latent = torch.zeros(1, self.unet.config.in_channels, size // self.vae_factor,
                             size // self.vae_factor, device=self.device, dtype=self.dtype)
        variant = self.variants[0]
        unet_key = variant.adapter if self.lora_mode == 'fused' else None
        embed = self.embedding(variant)
        attention = self.attention.get(unet_key)
        with self._adapters(unet_key, self._adapter_names([0], 1)), \
                (attention.recording() if attention else nullcontext()):
            out = self.taps[unet_key](latent, self.timestep, embed.hidden,
                                      added_cond_kwargs=self.added_conditions(embed, latent))
            if attention:
                out[ATTENTION_MAPS] = attention.aggregate(tuple(latent.shape[-2:]))
        return [dict(module=name, num_chs=f.shape[1],
                     reduction=input_stride(size // f.shape[-1], self.input_scale, name),
                     num_variants=len(self.variants)) for name, f in out.items()]


@torch.no_grad()
def _encode_with_adapter(parts, prompt: str, adapter: Optional[str],
                         scales: Dict[str, float]) -> PromptEmbedding:
    """``prompt``'s embedding with text-encoder LoRA ``adapter`` active (None: none)."""
    activate_adapter(parts.text_encoders, adapter, scales)
    return encode_prompt(parts.text_encoders, parts.tokenizers, prompt)


def _by_key(items: Sequence, key) -> List[Tuple[object, List[int]]]:
    """Indices of ``items`` grouped by ``key(item)`` (None: left out), in first-seen order."""
    groups = defaultdict(list)
    for i, item in enumerate(items):
        if key(item) is not None:
            groups[key(item)].append(i)
    return list(groups.items())


# The name the frozen half had before it became one source among several.
GATEFeatureExtractor = StableDiffusionSource
