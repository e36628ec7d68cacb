"""GATE backbone: frozen Stable Diffusion features as multi-scale MMSeg features."""
import math
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.dist import get_rank
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import nn

from mmseg.registry import MODELS
from mmseg.utils import get_classes
from ..amalgamation import VariantAmalgamation, refinement_stack
from ..diffusion.conditions import ConditionDetector
from ..diffusion.controlnets import load_controlnet
from ..diffusion.frozen import FrozenStableDiffusion
from ..diffusion.loading import DEFAULT_MODEL, load_stable_diffusion
from ..diffusion.variants import parse_variants

# The paper's segmentation features: the upsampler outputs of up blocks 0, 1 and 2
# (SD1.5 at 512x512: 1280 ch @ 1/32, 1280 ch @ 1/16, 640 ch @ 1/8).
DEFAULT_TAPS = ('up_blocks.0.upsamplers.0', 'up_blocks.1.upsamplers.0',
                'up_blocks.2.upsamplers.0')
# The UNet needs latent sides divisible by 8, i.e. image sides divisible by 64.
SIZE_MULTIPLE = 64


@MODELS.register_module()
class GATEBackbone(BaseModule):
    """Stable Diffusion UNet features, kept true to the image, for dense prediction.

    The image is encoded once by the VAE and noised lightly (``timestep``). The frozen UNet then
    runs once per guided *variant* (a prompt, optional ControlNets, an optional LoRA adapter;
    all variants of an image share one batch), stopping after the last tapped block. Per output
    level, the variants' activations are fused by a learned amalgamation and refined by
    trainable zero-initialised residual blocks. Outputs are ordered
    from high to low resolution (MMSeg's convention); for the default taps on SD1.5 they are
    ``(640 ch, stride 8), (1280 ch, stride 16), (1280 ch, stride 32)`` -- read them from
    ``out_channels`` and ``out_strides`` after building.

    Any input size works: images are padded to a multiple of 64 inside and the features are
    cropped back to ``ceil(size / stride)``.

    Args:
        sd_model (str): a local diffusers-format Stable Diffusion folder or a hub id.
            Default: ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
        prompt (str): text the UNet is conditioned on (any length); the default of every
            variant. Default: ''.
        class_names (str | Sequence[str], optional): the dataset's classes, or a dataset name
            known to ``mmseg.utils.get_classes`` ('ade20k', 'cityscapes', ...).
        append_class_names (bool): append the class names to every prompt (the paper's
            fine-grained prompts). Default: False.
        variants (Sequence[dict], optional): GATE's guided variants, each
            ``dict(prompt=None, controlnets=dict(name=scale), lora=None, lora_scale=1.0)``
            (see ``mmseg_gate/models/diffusion/variants.py``). Default: one prompt-only variant.
        controlnets (dict, optional): name -> ``dict(model=folder or hub id,
            condition=dict(type='canny', low_threshold=100, high_threshold=200))``.
        loras (dict, optional): name -> LoRA safetensors file (diffusers/peft or kohya format),
            loaded as adapters on the one UNet.
        batch_variants (bool): run the variants of an image as one UNet batch (mixing LoRA
            adapters per sample) or one after another (less memory). Default: True.
        num_assigners (int): weight assigners per level in the amalgamation; each adds the
            level's channels to the output. Default: 1.
        assigner_cfg (dict): ``hidden_channels`` and ``dropout_ratio`` of the assigners.
        taps (Sequence[str]): UNet submodule names to read features from.
            Default: the upsamplers of up blocks 0, 1, 2.
        timestep (int): noise level added to the latent, of 1000. Default: 50.
        noise_seed (int): seed of the added noise. In eval mode every forward uses this seed
            (reproducible predictions); in train mode a generator seeded with
            ``noise_seed + rank`` runs on. Default: 0.
        input_mean (Sequence[float]): the data preprocessor's ``mean`` (0-255 pixel units),
            used to turn its output back into the VAE's [-1, 1]. Default: 127.5 each.
        input_std (Sequence[float]): the data preprocessor's ``std``. Default: 127.5 each.
        frozen_dtype (str): dtype of the frozen parts: 'auto' (float16 on accelerators,
            float32 on the CPU), 'float32', 'float16' or 'bfloat16'. Default: 'auto'.
        num_refine_blocks (int): refinement blocks per output. Default: 1.
        norm_cfg (dict): norm layer of the refinement blocks.
            Default: ``dict(type='BN', requires_grad=True)``.
        init_cfg (dict, optional): initialisation of the trainable parts only.
    """

    def __init__(self,
                 sd_model: str = DEFAULT_MODEL,
                 prompt: str = '',
                 class_names: Optional[Union[str, Sequence[str]]] = None,
                 append_class_names: bool = False,
                 variants: Optional[Sequence[dict]] = None,
                 controlnets: Optional[Dict[str, dict]] = None,
                 loras: Optional[Dict[str, str]] = None,
                 batch_variants: bool = True,
                 num_assigners: int = 1,
                 assigner_cfg: dict = dict(hidden_channels=128, dropout_ratio=0.5),
                 taps: Sequence[str] = DEFAULT_TAPS,
                 timestep: int = 50,
                 noise_seed: int = 0,
                 input_mean: Sequence[float] = (127.5, 127.5, 127.5),
                 input_std: Sequence[float] = (127.5, 127.5, 127.5),
                 frozen_dtype: str = 'auto',
                 num_refine_blocks: int = 1,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg)
        controlnets, loras = dict(controlnets or {}), dict(loras or {})
        parsed = parse_variants(variants, prompt, list(controlnets), list(loras))
        if append_class_names:
            names = _class_names(class_names)
            parsed = [replace(v, prompt=f'{v.prompt.rstrip()} {names}'.strip()) for v in parsed]
        parts = load_stable_diffusion(sd_model)
        guidance = {name: (load_controlnet(cfg['model'], parts.unet),
                           ConditionDetector(**cfg.get('condition', dict(type='canny'))))
                    for name, cfg in controlnets.items()}
        self.diffusion = FrozenStableDiffusion(parts, taps, timestep, parsed, guidance, loras,
                                               frozen_dtype, batch_variants)
        shapes = self.diffusion.probe_shapes()
        # High resolution first; a stable sort keeps the given order within a stride.
        self.tap_order = sorted(range(len(shapes)), key=lambda i: shapes[i][1])
        self.out_strides = [shapes[i][1] for i in self.tap_order]
        self.amalgamations = nn.ModuleList(
            VariantAmalgamation(shapes[i][0], len(parsed), num_assigners, norm_cfg=norm_cfg,
                                **assigner_cfg) for i in self.tap_order)
        self.out_channels = [a.out_channels for a in self.amalgamations]
        self.refiners = nn.ModuleList(
            refinement_stack(c, num_refine_blocks, norm_cfg) for c in self.out_channels)
        # Kept in float32 whatever the module's dtype (half would round 58.395 to 58.40).
        self.input_mean = _as_pixel_stats(input_mean)
        self.input_std = _as_pixel_stats(input_std)
        # Follows .to()/.cuda()/.half() like the trainable parts: the frozen parts go to its
        # device (in `frozen_dtype`), the trainable parts run in its dtype.
        self.register_buffer('_placement', torch.zeros(0), persistent=False)
        self.noise_seed = noise_seed
        self._train_generator: Optional[torch.Generator] = None
        print_log(f'GATEBackbone: {sd_model}, {len(parsed)} variant(s), taps '
                  f'{[taps[i] for i in self.tap_order]} -> channels {self.out_channels}, '
                  f'strides {self.out_strides}; the UNet runs '
                  f'{len(self.diffusion.taps.stages_run)} stages', logger='current')

    def extra_repr(self) -> str:
        return (f'frozen={self.diffusion.source!r}, out_channels={self.out_channels}, '
                f'out_strides={self.out_strides}')

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self.diffusion.to(self._placement.device)
        return module

    def _generator(self) -> torch.Generator:
        if not self.training:
            return torch.Generator().manual_seed(self.noise_seed)
        return self._generator_for_training()

    def noise_generator_state(self) -> Optional[torch.Tensor]:
        """State of the training noise generator (None before the first training step);
        checkpoints carry it so that a resumed run draws the same noise."""
        return None if self._train_generator is None else self._train_generator.get_state()

    def set_noise_generator_state(self, state: torch.Tensor) -> None:
        self._generator_for_training().set_state(state)

    def _generator_for_training(self) -> torch.Generator:
        if self._train_generator is None:
            self._train_generator = torch.Generator().manual_seed(self.noise_seed + get_rank())
        return self._train_generator

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f'GATEBackbone expects images as (N, 3, H, W), got shape {tuple(x.shape)}. '
                'Stable Diffusion encodes RGB: convert grayscale/RGBA inputs to 3 channels in '
                "the data pipeline (e.g. LoadImageFromFile(color_type='color')).")

    def to_vae_range(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the data preprocessor's normalisation, into the VAE's [-1, 1], padded to a
        multiple of 64."""
        std, mean = self.input_std.to(x.device), self.input_mean.to(x.device)
        pixels = x.float() * std + mean
        return _pad_to_multiple(pixels / 127.5 - 1.0, SIZE_MULTIPLE)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        self._check_input(x)
        height, width = x.shape[-2:]
        pixels = self.to_vae_range(x)
        return self.fuse(self.diffusion(pixels, self._generator()), height, width)

    def fuse(self, per_variant: List[List[torch.Tensor]], height: int,
             width: int) -> Tuple[torch.Tensor, ...]:
        """Per output level: crop each variant's tap to the input size, amalgamate, refine."""
        dtype = self._placement.dtype  # the trainable parts' dtype (float32 unless .half())
        outs: List[torch.Tensor] = []
        for level, (i, stride) in enumerate(zip(self.tap_order, self.out_strides)):
            crop = (..., slice(math.ceil(height / stride)), slice(math.ceil(width / stride)))
            fused = self.amalgamations[level](
                [feats[i][crop].to(dtype) for feats in per_variant])
            outs.append(self.refiners[level](fused))
        return tuple(outs)


def _class_names(class_names) -> str:
    """The dataset's class names as prompt text."""
    if class_names is None:
        raise ValueError('GATEBackbone: append_class_names=True needs `class_names` (a list, '
                         "or a dataset name such as 'ade20k' or 'cityscapes').")
    names = get_classes(class_names) if isinstance(class_names, str) else list(class_names)
    return ', '.join(names)


def _as_pixel_stats(values: Sequence[float]) -> torch.Tensor:
    values = torch.as_tensor(values, dtype=torch.float32).flatten()
    if values.numel() != 3:
        raise ValueError(f'GATEBackbone: input_mean/input_std need 3 values (RGB), got '
                         f'{values.tolist()}.')
    return values.view(1, 3, 1, 1)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right by edge replication (no artificial borders in the features)."""
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode='replicate')
