"""GATE backbone: frozen diffusion features as multi-scale MMSeg features."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.dist import get_rank
from mmengine.logging import print_log
from mmengine.model import BaseModule

from mmseg.registry import MODELS
from ...datasets.images import normalized_to_model_range
from ...sources import build_source
from ...sources.common.latents import Noise, PerImageNoise
from ..amalgamation import GATEFusion


@MODELS.register_module()
class GATEBackbone(BaseModule):
    """Frozen diffusion features, kept true to the image, for dense prediction.

    The frozen half is a feature source (``mmseg_gate.sources``), by default GATE's
    :class:`StableDiffusionSource`: the image is encoded once by the VAE and noised lightly;
    the frozen UNet runs once per guided *variant* (a prompt, optional ControlNets, an optional
    LoRA; all variants of an image share one batch), stopping after the last tapped block. This
    module is the trainable half around it: per output level, the variants' activations are
    fused by a learned amalgamation and refined by trainable zero-initialised residual blocks.
    Outputs are ordered from high to low resolution (MMSeg's convention); for the default taps
    on SD1.5 they are ``(640 ch, stride 8), (1280 ch, stride 16), (1280 ch, stride 32)`` --
    read them from ``out_channels`` and ``out_strides`` after building.

    Any input size works: images are padded to the UNet's size multiple inside and the
    features are cropped back to ``ceil(size / stride)``.

    Args:
        source (dict): the frozen half's config, nested as MMSeg's VPD nests its
            ``diffusion_cfg``: ``dict(type='StableDiffusionSource', model=..., prompt=...,
            variants=..., controlnets=..., loras=..., taps=..., timestep=...)`` (``type``
            defaults to it; see :class:`StableDiffusionSource`), or any source config, e.g.
            ``dict(type='CompositeSource', sources=dict(...))``. With ``attention_maps`` the
            maps are one more output level.
        noise_seed (int): seed of the added noise. In eval mode each image's noise is drawn
            from this seed and the image's pixels (``PerImageNoise``: reproducible predictions,
            the same noise for an image in any batch, and another for every other image, as a
            feature store draws it); in train mode a generator seeded with
            ``noise_seed + rank`` runs on (and is saved in checkpoints). Default: 0.
        eval_noise (str): 'per_image' (above) or 'fresh': in eval mode too, the noise comes
            from the run's generator, new at every forward -- the authors' way (their
            img2img noising draws fresh noise at test time too); predictions then vary from
            run to run. Default: 'per_image'.
        num_assigners (int): weight assigners per level in the amalgamation; each adds the
            level's channels to the output. Default: 1.
        assigner_cfg (dict, optional): ``hidden_channels``, ``dropout_ratio`` and
            ``conv_init`` of the assigners ('kaiming', mmcv's, or 'pytorch', the authors');
            :class:`WeightAssigner`'s defaults (128, 0.5, 'kaiming') for those not given.
        input_mean (Sequence[float]): the data preprocessor's ``mean`` (0-255 pixel units),
            used to turn its output back into the VAE's [-1, 1]. Default: 127.5 each.
        input_std (Sequence[float]): the data preprocessor's ``std``. Default: 127.5 each.
        num_refine_blocks (int): refinement blocks per output. Default: 1.
        norm_cfg (dict): norm layer of the refinement blocks and assigners.
            Default: ``dict(type='BN', requires_grad=True)``.
        init_cfg (dict, optional): initialisation of the trainable parts only.
    """

    def __init__(self,
                 source: Optional[dict] = None,
                 noise_seed: int = 0,
                 eval_noise: str = 'per_image',
                 num_assigners: int = 1,
                 assigner_cfg: Optional[dict] = None,
                 input_mean: Sequence[float] = (127.5, 127.5, 127.5),
                 input_std: Sequence[float] = (127.5, 127.5, 127.5),
                 num_refine_blocks: int = 1,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 init_cfg: Optional[dict] = None,
                 **frozen_half):
        if frozen_half:
            raise TypeError(
                f'GATEBackbone got {sorted(frozen_half)}: the frozen half now has its own config. '
                "Move these keys into `source=dict(type='StableDiffusionSource', ...)`, e.g. "
                "backbone=dict(type='GATEBackbone', source=dict(model=..., prompt=..., "
                'variants=...), num_assigners=...).')
        if eval_noise not in ('per_image', 'fresh'):
            raise ValueError(f"GATEBackbone eval_noise must be 'per_image' or 'fresh', got "
                             f'{eval_noise!r}.')
        super().__init__(init_cfg)
        self.eval_noise = eval_noise
        self.source = build_source(source or {})
        self.fusion = GATEFusion(self.source.feature_info, num_assigners, assigner_cfg,
                                 num_refine_blocks, norm_cfg)
        self.out_names = self.fusion.names
        self.out_strides = self.fusion.strides
        self.out_channels = self.fusion.out_channels
        # Kept in float32 whatever the module's dtype (half would round 58.395 to 58.40).
        self.input_mean = _as_pixel_stats(input_mean)
        self.input_std = _as_pixel_stats(input_std)
        # Follows .to()/.cuda()/.half() like the trainable parts: the frozen parts go to its
        # device (in the source's dtype), the trainable parts run in its dtype.
        self.register_buffer('_placement', torch.zeros(0), persistent=False)
        self.noise_seed = noise_seed
        self._train_generator: Optional[torch.Generator] = None
        print_log(f'GATEBackbone: {self.source!r} -> channels {self.out_channels}, strides '
                  f'{self.out_strides}', logger='current')

    def extra_repr(self) -> str:
        return (f'source={self.source!r}, out_channels={self.out_channels}, '
                f'out_strides={self.out_strides}')

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self.source.to(self._placement.device)
        return module

    def _noise(self, images: torch.Tensor) -> Noise:
        """Eval: per image, from its pixels (unless ``eval_noise='fresh'``); train: the run's
        generator."""
        if not self.training and self.eval_noise == 'per_image':
            return PerImageNoise.for_images(images, self.noise_seed)
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
        """Undo the data preprocessor's normalisation, into the VAE's [-1, 1]."""
        return normalized_to_model_range(x, self.input_mean.to(x.device),
                                         self.input_std.to(x.device))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        self._check_input(x)
        images = self.to_vae_range(x)
        return self.fuse(self.source(images, generator=self._noise(images)))

    def fuse(self, per_variant: List[Dict[str, torch.Tensor]]) -> Tuple[torch.Tensor, ...]:
        """The trainable half, in this module's dtype (float32 unless ``.half()``)."""
        return self.fusion(per_variant, self._placement.dtype)


def _as_pixel_stats(values: Sequence[float]) -> torch.Tensor:
    values = torch.as_tensor(values, dtype=torch.float32).flatten()
    if values.numel() != 3:
        raise ValueError(f'GATEBackbone: input_mean/input_std need 3 values (RGB), got '
                         f'{values.tolist()}.')
    return values.view(1, 3, 1, 1)

