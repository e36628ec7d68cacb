"""DINOv2 patch features (transformers' ``Dinov2Model``) as a frozen source.

The strongest correspondence systems fuse Stable Diffusion's features with DINOv2's
("A Tale of Two Features", GeoAware-SC, DIY-SC). DINOv2 has no noise, prompts or guidance: one
variant, whose features are chosen hidden states -- ``'hidden_states.<i>'`` (the output of
block i, 0 the patch embeddings) or ``'last_hidden_state'`` (after the final layer norm) --
with the class token dropped and the patch tokens laid out as an (N, C, h, w) map at the
patch stride. Images are resized by ``input_scale`` (DINOv2's 14-pixel patches: 0.875 turns
a 512 input into 448 = 32 x 14, a stride of 16 input pixels), padded to whole patches,
normalised with ImageNet's mean and std as its image processor does, and run through
transformers' own forward; blocks after the last hidden state read are freed.
"""
import os.path as osp
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..engine.devices import resolve_dtype
from .base import (SOURCES, FeatureSource, Features, input_stride, move_frozen,
                   refuse_renamed)
from .common.loading import check_finite

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GET_DINOV2 = ('Get DINOv2 in transformers format with `hf download facebook/dinov2-base '
               '--local-dir checkpoints/dinov2-base --include "*.json" "*.safetensors"` and '
               "set the source's `model='checkpoints/dinov2-base'`.")


def load_dinov2(model: str):
    """``Dinov2Model.from_pretrained`` from safetensors, every weight of the file in place."""
    from transformers import Dinov2Model
    if osp.exists(model) and not osp.isfile(osp.join(model, 'model.safetensors')) \
            and not osp.isfile(osp.join(model, 'model.safetensors.index.json')):
        raise FileNotFoundError(f"'{model}' holds no model.safetensors (pickled weights are "
                                f'not loaded). {_GET_DINOV2}')
    try:
        network, info = Dinov2Model.from_pretrained(model, use_safetensors=True,
                                                    output_loading_info=True)
    except OSError as err:
        raise FileNotFoundError(f"Cannot load DINOv2 from '{model}' ({err}). "
                                f'{_GET_DINOV2}') from err
    except Exception as err:  # noqa: BLE001  (SafetensorError, size mismatches: no file named)
        message = str(err).strip().splitlines()[0] if str(err).strip() else ''
        raise ValueError(f"Cannot load DINOv2 from '{model}' ({type(err).__name__}: "
                         f'{message}): its model.safetensors is truncated, not safetensors, '
                         f'or of another size than its config.json. {_GET_DINOV2}') from err
    problems = {k: v for k, v in info.items() if v and k != 'error_msgs'} or \
        ({'error_msgs': info['error_msgs']} if info.get('error_msgs') else {})
    if problems:
        raise ValueError(f"DINOv2 weights in '{model}' do not fit Dinov2Model: {problems}. "
                         'A partial load would leave random weights.')
    check_finite(network, model)
    return network.eval().requires_grad_(False)


@SOURCES.register_module()
class DINOv2Source(FeatureSource):
    """DINOv2's patch tokens as maps (see the module docstring).

    Args:
        model (str): a local transformers folder (safetensors) or a hub id, e.g.
            ``facebook/dinov2-base``.
        taps (Sequence[str]): ``'hidden_states.<i>'`` and/or ``'last_hidden_state'``.
            Default: ('last_hidden_state', ).
        input_scale (float): the model sees the input resized by this factor. Default: 0.875
            (512 -> 448: 32 x 32 patches, stride 16).
        mean, std (Sequence[float]): the normalisation of [0, 1] pixels. Default: ImageNet's.
        frozen_dtype (str): 'auto' (float16 on accelerators, float32 on the CPU), 'float32',
            'float16' or 'bfloat16'. Default: 'auto'.

    Renamed arguments (refused, naming the new one): ``features`` -> ``taps``.
    """

    def __init__(self, model: str, taps: Sequence[str] = ('last_hidden_state', ),
                 input_scale: float = 0.875, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, frozen_dtype: str = 'auto', **renamed):
        refuse_renamed('DINOv2Source', renamed, dict(features='taps'))
        resolve_dtype(frozen_dtype, torch.device('cpu'))  # validate before loading
        self.model, self.taps = model, list(taps)
        self.network = load_dinov2(model)
        depth = self.network.config.num_hidden_layers
        layers = []
        for name in self.taps:
            if name == 'last_hidden_state':
                layers.append(depth)
                continue
            kind, _, index = name.partition('.')
            if kind != 'hidden_states' or not index.isdigit() or int(index) > depth:
                raise ValueError(f"DINOv2 tap {name!r}: use 'last_hidden_state' or "
                                 f"'hidden_states.<i>' with i in 0..{depth}.")
            layers.append(int(index))
        if not self.taps:
            raise ValueError("DINOv2Source needs a tap, e.g. 'last_hidden_state'.")
        needed = max(layers)
        if 'last_hidden_state' not in self.taps and needed < depth:
            # Blocks after the last one read never run.
            self.network.encoder.layer = nn.ModuleList(self.network.encoder.layer[:needed])
        self.patch = self.size_multiple = self.network.config.patch_size
        self.input_scale = float(input_scale)
        stride = input_stride(self.patch, self.input_scale, 'DINOv2 patch tokens')
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.dtype_name = frozen_dtype
        self.device, self.dtype = torch.device('cpu'), torch.float32
        self.feature_info = [dict(module=name, num_chs=self.network.config.hidden_size,
                                  reduction=stride, num_variants=1) for name in self.taps]

    def __repr__(self) -> str:
        return f'DINOv2Source({self.model!r}, {self.taps})'

    @property
    def variant_names(self) -> List[str]:
        return ['DINOv2']

    def to(self, device) -> 'DINOv2Source':
        move_frozen(self, [self.network], device)
        return self

    def check_timestep(self, timestep: Optional[int]) -> None:
        """DINOv2 has no noise: any timestep gives the same features."""

    def _extract(self, pixels: torch.Tensor, timestep: Optional[int],
                 generator=None) -> List[Features]:
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        pixels = (((pixels + 1) / 2 - mean) / std).to(self.device, self.dtype)
        out = self.network(pixel_values=pixels, output_hidden_states=True)
        h, w = pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch
        maps = {}
        for name in self.taps:
            tokens = out.last_hidden_state if name == 'last_hidden_state' else \
                out.hidden_states[int(name.split('.')[1])]
            patches = tokens[:, tokens.shape[1] - h * w:]  # the class token dropped
            maps[name] = patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return [maps]
