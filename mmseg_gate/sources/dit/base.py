"""Diffusion-transformer features: Stable Diffusion 3.x (``SD3Transformer2DModel``) and FLUX.1
(``FluxTransformer2DModel``) as frozen sources.

Each variant is a prompt, optionally with a LoRA (``loras=dict(name=file)``, a variant's
``lora='name'`` and ``lora_scale``: diffusers' DiT LoRA files, loaded as peft adapters with
every tensor of the file counted; one scale per LoRA) and ControlNets
(``controlnets=dict(canny=dict(model=..., condition=...))``, a variant's
``controlnets=dict(canny=1.0)``): on SD3, ``SD3ControlNetModel`` on the condition's VAE
latent (the posterior mode; shift and pooled projection as the SD3 ControlNet pipeline
treats each kind), its block residuals handed to the transformer's forward, which adds each
after its block
(a tapped block's own output is read before its residual: the residual shows from the next
block on); on FLUX, ``FluxControlNetModel`` (InstantX's kind: the packed condition latent,
double- and single-stream residuals). XLabs' FLUX ControlNets (a hint block), union
ControlNets (modes) and SD3.5 ControlNets with extra conditioning channels are not supported
yet: asking for one is an error. As for the UNet, the work is shared: the variants of an
image run as one transformer batch (each sample with its own prompt and, through peft's
mixed-adapter batches, its own LoRA), each (ControlNet, prompt) runs once at scale 1 and its
residuals are scaled per variant (diffusers' ControlNets scale linearly), and a variant
without ControlNets gets zero residuals; ``batch_variants=False`` runs them one by one.

A call encodes the image once with the VAE (shift and scale as the pipelines do), noises it
as the pipelines' img2img does -- ``timestep`` t of 1,000 is img2img at ``strength = t /
1000`` over 1,000 scheduler steps: the scheduler's shift (SD3's fixed
shift, FLUX's resolution-dependent ``mu``) decides the sigma, ``scale_noise`` mixes the noise
in -- and runs diffusers' own transformer forward, stopped right after the last tapped block
(the blocks after it are never built on FLUX, whose blocks of a stream are all alike, and
freed after loading on SD3, whose last joint block differs). A tap is a block,
``'transformer_blocks.<i>'`` (SD3's joint blocks, FLUX's double-stream blocks) or
``'single_transformer_blocks.<i>'`` (FLUX); its image tokens come back as an (N, C, h, w)
map at the patch stride (16 input pixels for both); its text tokens are not a map and are
never returned. Prompts are encoded once, by the
pipelines' own ``encode_prompt`` (CLIP-L/G and T5 for SD3, CLIP-L and T5 for FLUX, prompts of
any length as they encode them) before the transformer loads; the text encoders are dropped
afterwards, so they never share memory with it. FLUX's latents are
packed 2x2 into tokens with their position ids, and its guidance embedding gets
``guidance_scale`` (FLUX.1-dev; FLUX.1-schnell has none).

This file holds what both families share; each family's differences are the methods its
class overrides, ``SD3Source`` (``sd3.py``) and ``FluxSource`` (``flux.py``), so that the
shared code never asks which family it runs. ``DiTSource(model=...)`` returns the one the
folder's ``model_index.json`` names.
"""
import json
import os.path as osp
from abc import abstractmethod
from collections import Counter
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from mmengine.logging import print_log

from ...engine.devices import resolve_dtype
from ...fileio import read_safetensors, safetensors_metadata
from ..base import (SOURCES, FeatureSource, Features, check_ensemble_size, input_stride,
                    mean_over_draws, move_frozen)
from ..common.conditions import build_detectors
from ..common.latents import Noise, draw_noise, encode_latents, ensemble_noise
from ..common.loading import check_parts, drop_vae_decoder, load_weights
from ..common.lora import (BASE, activate_adapter, adapters_per_sample, check_lora_landed,
                           enable_adapters)
from ..common.taps import StopForward
from .massive import MASSIVE_RATIO, TAP_TRANSFORMS, discard, massive_channels, modulate, next_adaln

GET_DIT_HINT = ('Get a model in diffusers format, e.g. `hf download '
                'stabilityai/stable-diffusion-3.5-medium --local-dir checkpoints/sd35 '
                '--include "*.json" "*.txt" "*.model" "*.safetensors" --exclude "*.fp16.*"` '
                "(or black-forest-labs/FLUX.1-dev), and set the source's `model`.")
# The transformer's inputs that are one per sample, concatenated when variants run as one
# batch; the others (FLUX's position ids) are the same for every sample.
BATCHED = ('hidden_states', 'encoder_hidden_states', 'pooled_projections', 'timestep',
           'guidance')
# The store key of the transformer's ``temb`` among a pass's tapped tokens.
TEMB = 'temb'
# The side (pixels, rounded up to the model's multiple) of the probe image on which
# ``discard_channels='auto'`` finds the massive channels.
PROBE_SIDE = 256
# kind -> its family's class (SD3Source, FluxSource), filled as each is defined.
FAMILY_CLASSES: Dict[str, type] = {}


def read_kind(model: str) -> str:
    """'sd3' or 'flux': the pipeline a diffusers folder (or hub id) holds; a local folder
    must hold every part its features load."""
    try:
        index = DiffusionPipeline.load_config(model)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"'{model}' is not a diffusers pipeline folder ({err}). "
                                f'{GET_DIT_HINT}') from err
    families = {cls.pipeline_class.__name__: cls for cls in FAMILY_CLASSES.values()}
    family = families.get(index.get('_class_name'))
    if family is None:
        raise ValueError(f"'{model}' holds a {index.get('_class_name')}; DiT sources read "
                         f'{sorted(families)}.')
    if osp.isdir(model):
        check_parts(model, family.parts, index['_class_name'], GET_DIT_HINT)
    return family.kind


def load_scheduler(model: str) -> FlowMatchEulerDiscreteScheduler:
    """The pipeline's flow-matching scheduler (its shift decides the noise level)."""
    try:
        return FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder='scheduler')
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"Cannot load the scheduler of '{model}' ({err}). "
                                f'{GET_DIT_HINT}') from err


def model_classes(kind: str):
    """The transformer and ControlNet classes of a kind."""
    family = FAMILY_CLASSES[kind]
    return family.transformer_class, family.controlnet_class


def block_names(kind: str, config) -> List[str]:
    """A transformer's tappable blocks in running order, from its config."""
    return FAMILY_CLASSES[kind].block_names(config)


def truncated_build(kind: str, last: str) -> Dict[str, int]:
    """The config overrides that build a kind's transformer only up to block ``last``
    (none: built whole and cut after loading)."""
    return FAMILY_CLASSES[kind].truncated_build(last)


def load_text_parts(model: str, kind: str, dtype: Optional[torch.dtype] = None) -> Dict:
    """The pipeline's text encoders (complete-or-fail) and tokenizers, as its keyword
    arguments: SD3 CLIP-L, CLIP-G and T5; FLUX CLIP-L and T5."""
    return FAMILY_CLASSES[kind].load_text_parts(model, dtype)


def dtype_kwargs(dtype: Optional[torch.dtype]) -> Dict:
    """``from_pretrained``'s dtype argument, when one is chosen."""
    return {} if dtype is None else dict(torch_dtype=dtype)


def load_dit_lora(transformer, name: str, path: str, unused_blocks: Sequence[str] = ()
                  ) -> None:
    """A LoRA file (diffusers' DiT format) as adapter ``name`` of ``transformer``, every
    tensor counted: in a layer, or in one of the ``unused_blocks`` (freed or never built)."""
    fix = ('Train it again, or download it again (a LoRA of this transformer in diffusers\' '
           'format, as `save_lora_weights` writes).')
    state = {k: v for k, v in read_safetensors(path, 'LoRA file', fix).items()
             if k.startswith('transformer.')}
    if not state:
        raise ValueError(f"LoRA '{path}' holds no 'transformer.*' tensors: not a LoRA of "
                         'a diffusion transformer in diffusers\' format.')
    unused = tuple(f'transformer.{block}.' for block in unused_blocks)
    state = {k: v for k, v in state.items() if not k.startswith(unused)}
    # Its rank and alpha, as diffusers' own loading reads them (alpha != rank scales it).
    metadata = safetensors_metadata(path).get(LORA_ADAPTER_METADATA_KEY)
    try:
        transformer.load_lora_adapter(state, prefix='transformer', adapter_name=name,
                                      metadata=json.loads(metadata) if metadata else None)
    except Exception as err:  # peft/diffusers errors do not name the file
        raise ValueError(f"LoRA '{path}' could not be loaded into the transformer "
                         f'({type(err).__name__}: {err}).') from err
    check_lora_landed(transformer, name, state, 'transformer', path)


def load_dit_controlnet(kind: str, name: str, cfg: dict):
    """ControlNet ``name`` of a kind (complete-or-fail), refusing the kinds not supported."""
    return FAMILY_CLASSES[kind].load_controlnet(name, cfg)


def check_controlnet(net, name: str, cfg: dict):
    """``net`` (ControlNet ``name`` of ``cfg``), refused where it is of a kind not supported
    yet."""
    unsupported = ('extra conditioning channels (an SD3.5 ControlNet)'
                   if getattr(net.config, 'extra_conditioning_channels', 0) else
                   'a hint block (an XLabs ControlNet)'
                   if getattr(net, 'input_hint_block', None) is not None else
                   'modes (a union ControlNet)'
                   if getattr(net.config, 'num_mode', None) else None)
    if unsupported:
        raise ValueError(f"ControlNet '{name}' ({cfg['model']}) has {unsupported}; only "
                         'ControlNets on the condition latent alone are supported yet.')
    return net


@SOURCES.register_module()
class DiTSource(FeatureSource):
    """SD3.x or FLUX.1 transformer features per variant (prompt, LoRA, ControlNets; module
    docstring). Built as ``DiTSource``, it is the ``SD3Source`` or ``FluxSource`` of the
    folder's pipeline (configs may also name those).

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
            'float16' or 'bfloat16'; an explicit one is also the loading precision ('auto'
            loads float32). Default: 'auto'.
        noise_seed (int): seed of the noise when a call passes no generator (a
            ``torch.Generator`` or a ``PerImageNoise``). Default: 0.
        batch_variants (bool): run the variants of an image as one transformer batch (LoRAs
            chosen per sample, one ControlNet pass per ControlNet and prompt) or one after
            another (less memory, same features). Default: True.
        tap_transform (str): 'adaln': DiTF's treatment of massive activations (``massive.py``):
            each tap's image tokens LayerNormed and modulated by the AdaLN of the block after
            it, as the transformer itself reads them; 'raw': the block outputs as they are.
            Default: 'adaln'.
        discard_channels ('auto' | Sequence[int] | None): channels zeroed before the
            treatment (DiTF's channel discard; FLUX.1-dev's are 154 and 1446): 'auto' finds
            each tap's massive channels on the first call (``find_massive_channels``,
            logged); None discards none. Default: 'auto'.
        massive_ratio (float): 'auto''s threshold: mean magnitude over this many times the
            median channel's. Default: 100.
        ensemble_size (int): noise draws averaged per image before the treatment (DiTF: 8).
            Default: 1.
        timestep_shift (bool): True: ``timestep`` is img2img's strength with the scheduler's
            shift; False: the noise level sigma is ``timestep / 1000`` exactly (DiTF's
            ``t = 260`` is sigma 0.26). Default: True.
    """

    # Their defaults changed the features (raw -> DiTF's treatment): stores record them.
    recorded_defaults = ('tap_transform', 'discard_channels', 'massive_ratio')
    # Each family's, set by its class.
    kind: str  # 'sd3' or 'flux': for messages and reports only
    pipeline_class: type  # the diffusers pipeline its folders hold
    transformer_class: type
    controlnet_class: type
    parts: Dict[str, str]  # the folder's parts its features load (PART_FILES kinds)
    residual_keys: Tuple[str, ...]  # the transformer's arguments for ControlNet residuals

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if 'kind' in cls.__dict__:  # a family's own class, not a subclass of one
            FAMILY_CLASSES[cls.kind] = cls

    def __new__(cls, model: Optional[str] = None, *args, **kwargs):
        """The class of the folder's family: one source type for configs, one class per
        family for the code."""
        if model is None:  # unpickling a family's source; a missing model fails in __init__
            if cls is DiTSource:
                raise TypeError("DiTSource() missing 1 required argument: 'model'")
            return super().__new__(cls)
        family = FAMILY_CLASSES[read_kind(model)]
        if cls is DiTSource:
            cls = family
        elif not issubclass(cls, family):
            raise ValueError(f"'{model}' holds a {family.pipeline_class.__name__}: name its "
                             f'source {family.__name__} (or DiTSource, which chooses by the '
                             f'folder), not {cls.__name__}.')
        return super().__new__(cls)

    def __init__(self, model: str, prompt: str = '', variants: Optional[Sequence[dict]] = None,
                 loras: Optional[Dict[str, str]] = None,
                 controlnets: Optional[Dict[str, dict]] = None,
                 taps: Optional[Sequence[str]] = None, timestep: int = 50,
                 guidance_scale: float = 3.5, max_sequence_length: Optional[int] = None,
                 input_scale: float = 1.0, frozen_dtype: str = 'auto', noise_seed: int = 0,
                 batch_variants: bool = True, tap_transform: str = 'adaln',
                 discard_channels: Union[str, Sequence[int], None] = 'auto',
                 massive_ratio: float = MASSIVE_RATIO, ensemble_size: int = 1,
                 timestep_shift: bool = True):
        resolve_dtype(frozen_dtype, torch.device('cpu'))
        if tap_transform not in TAP_TRANSFORMS:
            raise ValueError(f'DiTSource tap_transform must be one of {TAP_TRANSFORMS}, got '
                             f'{tap_transform!r}.')
        if not (discard_channels is None or discard_channels == 'auto' or (
                not isinstance(discard_channels, str) and
                all(isinstance(c, int) and c >= 0 for c in discard_channels))):
            raise ValueError("DiTSource discard_channels must be 'auto', a list of channel "
                             f'indices or None, got {discard_channels!r}.')
        self.tap_transform, self.massive_ratio = tap_transform, float(massive_ratio)
        self.discard_channels = discard_channels
        self.ensemble_size = check_ensemble_size(ensemble_size, 'DiTSource')
        self.timestep_shift = bool(timestep_shift)
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
        for i, variant in enumerate(variants):
            if variant.get('lora') is not None and \
                    variant.get('lora_scale', 1.0) != self.lora_scales[variant['lora']]:
                raise ValueError(f"DiTSource variant {i}: LoRA {variant['lora']!r} is used at "
                                 'two scales; one LoRA has one scale here (list the file '
                                 'twice in `loras`, under two names).')
        self.timestep = self._checked(timestep)
        self.model = model  # its family was read from it (read_kind) by __new__
        try:
            config = self.transformer_class.load_config(model, subfolder='transformer')
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"'{model}/transformer' has no readable config ({err}). "
                                    f'{GET_DIT_HINT}') from err
        names = self.block_names(config)
        self.taps = list(taps or [self.default_tap(names, config)])
        for tap in self.taps:
            if tap not in names:
                raise KeyError(f"Tap '{tap}' is not a block of this transformer: taps are "
                               f'whole blocks ({names[0]} ... {names[-1]}), whose image tokens '
                               'come back as maps; text tokens are not a spatial map and '
                               'cannot be tapped.')
        self.final = names[max(names.index(t) for t in self.taps)]
        # The AdaLN treatment also needs the AdaLN of the block after the last tap.
        built = names[min(names.index(self.final) + 1, len(names) - 1)] \
            if tap_transform == 'adaln' else self.final
        # An explicit precision loads in it (FLUX.1-dev: 24 GB in bfloat16, not 48 in
        # float32); 'auto' loads float32 and is converted where the source moves.
        load_dtype = None if frozen_dtype == 'auto' else resolve_dtype(frozen_dtype, 'cpu')
        # The prompts first: the text encoders (FLUX's and SD3's T5-XXL: 9.5 GB in
        # bfloat16) are gone before the transformer loads.
        self.scheduler = load_scheduler(model)
        self.embeddings = self.encode_prompts(model, self.prompts, max_sequence_length,
                                              load_dtype, self.scheduler)
        self.unused_blocks = names[names.index(self.final) + 1:]
        self.transformer = load_weights(
            self.transformer_class, model, 'transformer', GET_DIT_HINT,
            unused_blocks=names[names.index(built) + 1:],
            **self.truncated_build(built),
            **dtype_kwargs(load_dtype))
        # Each tap's next AdaLN, kept when the blocks after the last tap are freed.
        self.adalns = {tap: next_adaln(self.transformer, names, tap) for tap in self.taps} \
            if tap_transform == 'adaln' else {}
        self.prune_after_last_tap()
        # Per tap the massive channels zeroed ('auto': found on the first call).
        self.discarded: Optional[Dict[str, List[int]]] = None \
            if discard_channels == 'auto' else {t: list(discard_channels or []) for t in self.taps}
        self.vae = load_weights(AutoencoderKL, model, 'vae', GET_DIT_HINT,
                                **dtype_kwargs(load_dtype))
        drop_vae_decoder(self.vae)
        self.controlnets = {name: self.load_controlnet(name, cfg)
                            for name, cfg in controlnets.items()}
        self.detectors = build_detectors(controlnets)
        for nets in self.variant_controlnets:
            self._layout(nets)  # a variant's ControlNets must have the same blocks
        self.batch_variants = batch_variants
        for name in dict.fromkeys(n for n in self.variant_loras if n is not None):
            load_dit_lora(self.transformer, name, loras[name], self.unused_blocks)
        self.guidance_scale = guidance_scale
        self.vae_factor = 2**(len(self.vae.config.block_out_channels) - 1)
        self.patch = self.patch_size()
        self.size_multiple = self.vae_factor * self.patch
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

    # The family hooks: what SD3Source and FluxSource each do their own way.

    @classmethod
    def block_names(cls, config) -> List[str]:
        """A transformer's tappable blocks in running order, from its config: its joint
        (double-stream) blocks."""
        return [f'transformer_blocks.{i}' for i in range(config['num_layers'])]

    @staticmethod
    @abstractmethod
    def default_tap(names: List[str], config) -> str:
        """The block read when a config names no taps."""

    @staticmethod
    def truncated_build(last: str) -> Dict[str, int]:
        """Config overrides that build the transformer only up to block ``last``; none where
        the blocks differ (built whole, then cut by :meth:`prune_after_last_tap`)."""
        return {}

    def prune_after_last_tap(self) -> List[str]:
        """Blocks after the last tap never run: free those built (:meth:`truncated_build`
        may have left them out already)."""
        stream, index = self.final.rsplit('.', 1)
        blocks = list(getattr(self.transformer, stream))
        setattr(self.transformer, stream, torch.nn.ModuleList(blocks[:int(index) + 1]))
        return [f'{stream}.{i}' for i in range(int(index) + 1, len(blocks))]

    # The family's text encoders and tokenizers: pipeline keyword (= subfolder) -> class.
    text_parts: Dict[str, type] = {}

    @classmethod
    def load_text_parts(cls, model: str, dtype: Optional[torch.dtype] = None) -> Dict:
        """The pipeline's text encoders (complete-or-fail) and tokenizers
        (:attr:`text_parts`), as its keyword arguments."""
        return {name: part.from_pretrained(model, subfolder=name) if name.startswith('tokenizer')
                else load_weights(part, model, name, GET_DIT_HINT, **dtype_kwargs(dtype))
                for name, part in cls.text_parts.items()}

    @classmethod
    def load_controlnet(cls, name: str, cfg: dict):
        """ControlNet ``name`` of this family (complete-or-fail), refusing the kinds not
        supported."""
        return check_controlnet(load_weights(cls.controlnet_class, cfg['model'], None,
                                             GET_DIT_HINT), name, cfg)

    @staticmethod
    @abstractmethod
    def prompt_embeddings(pipe, prompt: str, length: Dict) -> Dict[str, torch.Tensor]:
        """One prompt through ``pipe.encode_prompt``: the transformer's text inputs (no
        source state: the LoRA trainer encodes its captions with it too)."""

    @abstractmethod
    def patch_size(self) -> int:
        """Latent pixels per token side."""

    def schedule(self, steps: int, image_seq_len: int) -> None:
        """Set the scheduler's ``steps`` timesteps, with its own shift."""
        self.scheduler.set_timesteps(steps)

    def tokens(self, latents: torch.Tensor, grid: Tuple[int, int]) -> Dict:
        """The transformer's image inputs of (N, C, H, W) latents (a ``grid`` of tokens),
        the same for every variant."""
        return dict(hidden_states=latents)

    def family_inputs(self, inputs: Dict, embed: Dict, n: int) -> Dict:
        """``inputs`` (for ``n`` images with one prompt, ``embed``: its embeddings on the
        device) completed with what the family's transformer also takes."""
        return inputs

    @abstractmethod
    def control_latent(self, name: str, latent: torch.Tensor) -> torch.Tensor:
        """ControlNet ``name``'s condition input from its condition's VAE latent."""

    @abstractmethod
    def controlnet_residuals(self, net, inputs: Dict, condition: torch.Tensor) -> List:
        """``net``'s residuals at scale 1 for one prompt's transformer ``inputs``: one
        list per entry of ``residual_keys`` (None where the ControlNet gives none)."""

    # Shared by both families.

    @staticmethod
    def _checked(timestep) -> int:
        if isinstance(timestep, bool) or not isinstance(timestep, int) or \
                not 0 <= timestep < 1000:
            raise ValueError(f'DiTSource timestep must be an integer in [0, 1000) (img2img '
                             f'strength t / 1000), got {timestep!r}.')
        return timestep

    def __repr__(self) -> str:
        return f'DiTSource({self.model!r}, {self.kind}, taps {self.taps})'

    @property
    def variant_names(self) -> List[str]:
        """Short names as the Stable Diffusion source's: the guidance, with the prompt's text
        only where the variants' prompts differ."""
        differ = len(set(self.prompts)) > 1
        return [' + '.join([f'prompt {p!r}' if differ else 'prompt',
                            *(name if scale == 1 else f'{name}x{scale:g}'
                              for name, scale in nets.items()),
                            *([f'lora {lora}' + ('' if self.lora_scales[lora] == 1 else
                                                 f'x{self.lora_scales[lora]:g}')]
                              if lora else [])])
                for p, lora, nets in zip(self.prompts, self.variant_loras,
                                         self.variant_controlnets)]

    def control_latents(self, name: str, pixels: torch.Tensor) -> torch.Tensor:
        """ControlNet ``name``'s condition of ``pixels`` as the ControlNet pipelines feed
        it: the detector's map in [-1, 1], VAE-encoded (posterior mode), then shifted and
        scaled as the family's pipeline does (:meth:`control_latent`)."""
        cond = self.detectors[name](pixels.float()).to(self.device, self.dtype) * 2 - 1
        return self.control_latent(name, self.vae.encode(cond).latent_dist.mode())

    def _controlnet(self, name: str, inputs: Dict, condition: torch.Tensor) -> List:
        """ControlNet ``name``'s residuals at scale 1 for one prompt's ``inputs`` (their
        scale is a factor on them, as in diffusers' ControlNets: scaled by the caller)."""
        self.counts['controlnet_passes'] += inputs['hidden_states'].shape[0]
        return self.controlnet_residuals(self.controlnets[name], inputs, condition)

    def _residuals(self, indices: List[int], per_prompt: Dict, conditions: Dict,
                   cache: Dict) -> Dict:
        """The transformer's ControlNet arguments for a batch of variants: each variant's
        scaled sum of its ControlNets' residuals (as diffusers' multi-ControlNets sum them;
        zeros for a variant without), concatenated; one pass per (ControlNet, prompt)."""
        sums = []
        for i in indices:
            total = None
            for name, scale in self.variant_controlnets[i].items():
                key = (name, self.prompts[i])
                if key not in cache:
                    cache[key] = self._controlnet(name, per_prompt[self.prompts[i]],
                                                  conditions[name])
                scaled = [None if level is None else [scale * r for r in level]
                          for level in cache[key]]
                total = scaled if total is None else [
                    None if a is None else [x + y for x, y in zip(a, b)]
                    for a, b in zip(total, scaled)]
            sums.append(total)
        like = next(s for s in sums if s is not None)
        sums = [s if s is not None else [None if level is None else
                                         [torch.zeros_like(r) for r in level]
                                         for level in like] for s in sums]
        return {key: None if like[k] is None else
                [torch.cat(rows) for rows in zip(*(s[k] for s in sums))]
                for k, key in enumerate(self.residual_keys)}

    def _groups(self) -> List[List[int]]:
        """Variants run as one transformer batch: all of them (``batch_variants``), split
        only where their ControlNets' residuals have different layouts or their prompts
        different lengths (the pipelines pad them to one length)."""
        if not self.batch_variants:
            return [[i] for i in range(len(self.prompts))]
        layouts = [self._layout(nets) for nets in self.variant_controlnets]
        first = next((layout for layout in layouts if layout is not None), None)
        groups: Dict = {}
        for i, layout in enumerate(layouts):
            length = self.embeddings[self.prompts[i]]['encoder_hidden_states'].shape[1]
            groups.setdefault((first if layout is None else layout, length), []).append(i)
        return list(groups.values())

    def _layout(self, nets: Dict[str, float]):
        """The block counts of a variant's ControlNets (None without any)."""
        if not nets:
            return None
        layouts = {(net.config.num_layers, getattr(net.config, 'num_single_layers', 0))
                   for net in (self.controlnets[name] for name in nets)}
        if len(layouts) > 1:
            raise ValueError(f'DiTSource: the ControlNets {sorted(nets)} of one variant have '
                             f'different numbers of blocks ({sorted(layouts)}); their '
                             'residuals are summed block by block, as diffusers\' '
                             'multi-ControlNets do, so they must match.')
        return layouts.pop()

    def check_timestep(self, timestep: Optional[int]) -> None:
        if timestep is not None:
            self._checked(timestep)

    @classmethod
    def encode_prompts(cls, model: str, prompts: Sequence[str],
                       max_sequence_length: Optional[int], dtype: Optional[torch.dtype],
                       scheduler) -> Dict[str, Dict[str, torch.Tensor]]:
        """Each distinct prompt -> its transformer text inputs, through the family
        pipeline's own ``encode_prompt`` (:meth:`prompt_embeddings`); the text encoders are
        loaded for it and not kept. The source's prompts and the LoRA trainer's captions."""
        parts = cls.load_text_parts(model, dtype)
        pipe = cls.pipeline_class(transformer=None, scheduler=scheduler, vae=None, **parts)
        length = dict(max_sequence_length=max_sequence_length) if max_sequence_length else {}
        with torch.no_grad():
            embeddings = {prompt: cls.prompt_embeddings(pipe, prompt, length)
                          for prompt in dict.fromkeys(prompts)}
        del pipe, parts  # the text encoders are not needed again
        return embeddings

    def to(self, device) -> 'DiTSource':
        move_frozen(self, [self.transformer, self.vae, *self.controlnets.values(),
                           *self.adalns.values()], device)
        return self

    def noise_timestep(self, timestep: int, image_seq_len: int) -> torch.Tensor:
        """The scheduler timestep img2img at strength t / 1000 (over 1,000 steps) starts
        from, with the scheduler's shift (FLUX: for ``image_seq_len`` tokens)."""
        steps = 1000
        self.schedule(steps, image_seq_len)
        start = int(max(steps - min(steps * timestep / 1000, steps), 0))
        return self.scheduler.timesteps[start:start + 1]

    @contextmanager
    def _reading(self, store: Dict[str, torch.Tensor]):
        """Forward hooks keeping the taps' image tokens; the last tapped block stops the
        pass."""
        modules = dict(self.transformer.named_modules())
        final = self.final

        def keep(name):
            def hook(_module, args, kwargs, output):
                store[name] = output[1]  # (text tokens, image tokens): the image stream
                store[TEMB] = kwargs['temb'] if 'temb' in kwargs else args[2]
                if name == final:
                    raise StopForward
            return hook
        handles = [modules[t].register_forward_hook(keep(t), with_kwargs=True)
                   for t in self.taps]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _prompt_inputs(self, prompt: str, tokens: Dict, t: torch.Tensor, n: int) -> Dict:
        """The transformer's inputs for ``n`` images with one prompt."""
        embed = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
                 for k, v in self.embeddings[prompt].items()}
        inputs = dict(tokens, encoder_hidden_states=embed['encoder_hidden_states'].expand(
            n, -1, -1), pooled_projections=embed['pooled_projections'].expand(n, -1),
                      timestep=t.to(self.device, self.dtype).expand(n))
        return self.family_inputs(inputs, embed, n)

    def _adapters(self, indices: List[int], n: int):
        """The batch's LoRAs: one for all (or none) set on the transformer; different ones
        chosen per sample (peft's mixed-adapter batches)."""
        loras = [self.variant_loras[i] for i in indices]
        if len(set(loras)) == 1:
            activate_adapter([self.transformer], loras[0], self.lora_scales)
            return nullcontext()
        enable_adapters([self.transformer], self.lora_scales)
        return adapters_per_sample(self.transformer, [lora or BASE for lora in loras
                                                      for _ in range(n)])

    @torch.no_grad()
    def _extract(self, pixels: torch.Tensor, timestep: Optional[int],
                 generator: Optional[Noise]) -> List[Features]:
        if self.discarded is None:
            self.discarded = self.find_massive_channels()
        tokens, tembs, grid = self._tap_tokens(pixels, timestep, generator)
        n = pixels.shape[0]
        return [{tap: self._treated(tap, variant[tap], temb).transpose(1, 2).reshape(
            n, -1, *grid) for tap in self.taps} for variant, temb in zip(tokens, tembs)]

    def _treated(self, tap: str, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """A tap's image tokens (N, L, C) as returned: massive channels zeroed, then (the
        AdaLN treatment) normalised and modulated by the next block's AdaLN (massive.py)."""
        tokens = discard(tokens, self.discarded[tap])
        if self.tap_transform == 'adaln':
            tokens = modulate(self.adalns[tap], tokens, temb)
        return tokens

    def find_massive_channels(self) -> Dict[str, List[int]]:
        """Per tap, the massive-activation channels of variant 0's raw tokens on a fixed
        probe image (:func:`massive_channels`); logged. Not counted in ``counts``."""
        counts = Counter(self.counts)
        side = -(-PROBE_SIDE // self.size_multiple) * self.size_multiple
        coarse = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        probe = F.interpolate(coarse, size=(side, side), mode='bilinear', align_corners=False)
        tokens, _, _ = self._tap_tokens(probe.to(self.device), self.timestep,
                                        torch.Generator().manual_seed(self.noise_seed),
                                        draws=1, variants=[0])
        self.counts = counts
        found = {tap: massive_channels(tokens[0][tap], self.massive_ratio) for tap in self.taps}
        print_log(f'{type(self).__name__}: massive-activation channels (above '
                  f'{self.massive_ratio:g}x the median magnitude), discarded: {found}',
                  logger='current')
        return found

    def _noised(self, clean: torch.Tensor, timestep: int, generator: Noise, grid):
        """The noised latents and the transformer's timestep: img2img's at strength
        t / 1000 with the scheduler's shift, or (``timestep_shift=False``, DiTF's) sigma =
        t / 1000 exactly."""
        noise = draw_noise(clean.shape, generator).to(clean)
        self.counts['noise_samples'] += clean.shape[0]
        if not self.timestep_shift:
            sigma = timestep / 1000
            return (1 - sigma) * clean + sigma * noise, torch.tensor([float(timestep)])
        t = self.noise_timestep(timestep, grid[0] * grid[1])
        return self.scheduler.scale_noise(clean, t, noise), t

    def _tap_tokens(self, pixels: torch.Tensor, timestep: Optional[int],
                    generator: Optional[Noise], draws: Optional[int] = None,
                    variants: Optional[List[int]] = None):
        """Per variant (all, or ``variants``) the taps' raw image tokens (N, L, C), averaged
        over ``draws`` noise draws per image (default ``ensemble_size``: the latent encoded
        once and repeated), and the transformer's ``temb`` (N, D); and the token grid."""
        timestep = self.timestep if timestep is None else timestep
        draws = self.ensemble_size if draws is None else draws
        if generator is None:
            generator = torch.Generator().manual_seed(self.noise_seed)
        pixels = pixels.to(self.device, self.dtype)
        self.counts['vae_encodes'] += pixels.shape[0]
        clean = encode_latents(self.vae, pixels).repeat_interleave(draws, 0)
        n, _, lh, lw = clean.shape
        grid = (lh // self.patch, lw // self.patch)
        if timestep == 0:
            latents, t = clean, torch.zeros(1)
        else:
            latents, t = self._noised(clean, timestep, ensemble_noise(generator, draws), grid)
        run = range(len(self.prompts)) if variants is None else variants
        used = dict.fromkeys(name for i in run for name in self.variant_controlnets[i])
        conditions = {name: self.control_latents(name, pixels).repeat_interleave(draws, 0)
                      for name in used}
        tokens = self.tokens(latents, grid)
        per_prompt = {prompt: self._prompt_inputs(prompt, tokens, t, n)
                      for prompt in dict.fromkeys(self.prompts)}
        outputs: List[Optional[Features]] = [None] * len(self.prompts)
        tembs: List[Optional[torch.Tensor]] = [None] * len(self.prompts)
        cache: Dict = {}
        groups = self._groups() if variants is None else [[i] for i in variants]
        for indices in groups:
            first = per_prompt[self.prompts[indices[0]]]
            inputs = {key: torch.cat([per_prompt[self.prompts[i]][key] for i in indices])
                      if key in BATCHED else value for key, value in first.items()}
            if any(self.variant_controlnets[i] for i in indices):
                inputs.update(self._residuals(indices, per_prompt, conditions, cache))
            store: Dict[str, torch.Tensor] = {}
            self.counts['transformer_passes'] += n * len(indices)
            with self._adapters(indices, n), self._reading(store):
                try:
                    self.transformer(**inputs, return_dict=False)
                except StopForward:
                    pass
            for j, i in enumerate(indices):
                rows = slice(j * n, (j + 1) * n)
                outputs[i] = {name: mean_over_draws(store[name][rows], draws)
                              for name in self.taps}
                tembs[i] = store[TEMB][rows][::draws]
        return outputs, tembs, grid
