"""GATE backbone: frozen Stable Diffusion features as multi-scale MMSeg features."""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.dist import get_rank
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import nn

from mmseg.registry import MODELS
from ..amalgamation import refinement_stack
from ..diffusion.frozen import FrozenStableDiffusion
from ..diffusion.loading import DEFAULT_MODEL, load_stable_diffusion

# The paper's segmentation features: the upsampler outputs of up blocks 0, 1 and 2
# (SD1.5 at 512x512: 1280 ch @ 1/32, 1280 ch @ 1/16, 640 ch @ 1/8).
DEFAULT_TAPS = ('up_blocks.0.upsamplers.0', 'up_blocks.1.upsamplers.0',
                'up_blocks.2.upsamplers.0')
# The UNet needs latent sides divisible by 8, i.e. image sides divisible by 64.
SIZE_MULTIPLE = 64


@MODELS.register_module()
class GATEBackbone(BaseModule):
    """Stable Diffusion UNet features, kept true to the image, for dense prediction.

    The image is encoded once by the VAE, noised lightly (``timestep``), and passed through the
    frozen UNet with a prompt embedding; the UNet stops after the last tapped block. Each tapped
    activation is refined by trainable zero-initialised residual blocks. Outputs are ordered
    from high to low resolution (MMSeg's convention); for the default taps on SD1.5 they are
    ``(640 ch, stride 8), (1280 ch, stride 16), (1280 ch, stride 32)`` -- read them from
    ``out_channels`` and ``out_strides`` after building.

    Any input size works: images are padded to a multiple of 64 inside and the features are
    cropped back to ``ceil(size / stride)``.

    Args:
        sd_model (str): a local diffusers-format Stable Diffusion folder or a hub id.
            Default: ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
        prompt (str): text the UNet is conditioned on (any length). Default: ''.
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
        parts = load_stable_diffusion(sd_model)
        self.diffusion = FrozenStableDiffusion(parts, taps, timestep, prompt, frozen_dtype)
        shapes = self.diffusion.probe_shapes()
        # High resolution first; a stable sort keeps the given order within a stride.
        self.tap_order = sorted(range(len(shapes)), key=lambda i: shapes[i][1])
        self.out_channels = [shapes[i][0] for i in self.tap_order]
        self.out_strides = [shapes[i][1] for i in self.tap_order]
        self.refiners = nn.ModuleList(
            refinement_stack(c, num_refine_blocks, norm_cfg) for c in self.out_channels)
        self.register_buffer('input_mean', _as_pixel_stats(input_mean), persistent=False)
        self.register_buffer('input_std', _as_pixel_stats(input_std), persistent=False)
        self.noise_seed = noise_seed
        self._train_generator: Optional[torch.Generator] = None
        print_log(f'GATEBackbone: {sd_model}, taps {[taps[i] for i in self.tap_order]} -> '
                  f'channels {self.out_channels}, strides {self.out_strides}; the UNet runs '
                  f'{len(self.diffusion.taps.stages_run)} stages', logger='current')

    def extra_repr(self) -> str:
        return (f'frozen={self.diffusion.source!r}, out_channels={self.out_channels}, '
                f'out_strides={self.out_strides}')

    def _generator(self) -> torch.Generator:
        if not self.training:
            return torch.Generator().manual_seed(self.noise_seed)
        if self._train_generator is None:
            self._train_generator = torch.Generator().manual_seed(self.noise_seed + get_rank())
        return self._train_generator

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f'GATEBackbone expects images as (N, 3, H, W), got shape {tuple(x.shape)}. '
                'Stable Diffusion encodes RGB: convert grayscale/RGBA inputs to 3 channels in '
                "the data pipeline (e.g. LoadImageFromFile(color_type='color')).")

    def _to_vae_range(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.float() * self.input_std + self.input_mean
        return pixels / 127.5 - 1.0

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        self._check_input(x)
        height, width = x.shape[-2:]
        pixels = _pad_to_multiple(self._to_vae_range(x), SIZE_MULTIPLE)
        feats = self.diffusion(pixels, self._generator())
        outs: List[torch.Tensor] = []
        for refiner, i, stride in zip(self.refiners, self.tap_order, self.out_strides):
            feat = feats[i][..., :math.ceil(height / stride), :math.ceil(width / stride)]
            outs.append(refiner(feat.float()))
        return tuple(outs)


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
