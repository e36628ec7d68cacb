"""Aggregated cross-attention maps: how much each prompt token attends to each pixel.

The authors' code offers these as ``up_cross`` features: the cross-attention probabilities of
the UNet's up blocks, averaged over heads, per prompt token, averaged over the attention layers
of one resolution, resized to the latent's resolution (nearest) and concatenated over the
resolutions used (by default those at image strides 32 and 16: 2 x 77 channels).
Probabilities are not exposed by diffusers' fused attention, and no processor or method of
diffusers is replaced for them: while :meth:`CrossAttentionMaps.recording` is active, forward
hooks read each chosen layer's projected queries and keys (``to_q``, ``to_k``: LoRA included)
and diffusers' own ``Attention.get_attention_scores`` turns them into the probabilities its
processors use. The hooks go when the block ends; the attention itself runs as before.
"""
from contextlib import contextmanager
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..common.taps import stage_of

_PLACES = {'down': 'down_blocks', 'mid': 'mid_block', 'up': 'up_blocks'}


def block_scale(unet, stage: str) -> int:
    """How much smaller than the latent a stage's attention layers work: down block i at
    2**i, the mid block at the lowest resolution, up block i mirrored."""
    lowest = len(unet.down_blocks) - 1
    if stage == 'mid_block':
        return 2**lowest
    kind, index = stage.split('.')
    return 2**int(index) if kind == 'down_blocks' else 2**(lowest - int(index))


class CrossAttentionMaps:
    """Records the cross-attention maps of ``unet`` and aggregates them.

    Args:
        unet: the UNet whose ``attn2`` layers are read.
        places: which parts of the UNet: any of 'down', 'mid', 'up'. Default: ('up', ).
        strides: image strides of the layers used, one output group each, in this order.
            Default: (32, 16), the authors' choice for 512-pixel SD1.5 inputs.
        tokens: prompt tokens kept per group (the first chunk: 77). Default: 77.
        vae_factor: the VAE's downsampling (8).
    """

    def __init__(self, unet, places: Sequence[str] = ('up', ),
                 strides: Sequence[int] = (32, 16), tokens: int = 77, vae_factor: int = 8):
        unknown = set(places) - set(_PLACES)
        if unknown:
            raise ValueError(f'attention_maps places {sorted(unknown)} are unknown; use any of '
                             f'{sorted(_PLACES)}.')
        self.strides, self.tokens, self.vae_factor = list(strides), tokens, vae_factor
        prefixes = tuple(_PLACES[p] for p in places)
        available: Dict[str, int] = {}  # attn2 layer name -> image stride
        for name, _ in unet.named_modules():
            if name.endswith('.attn2') and name.startswith(prefixes):
                available[name] = block_scale(unet, stage_of(name)) * vae_factor
        self.layers = {n: s for n, s in available.items() if s in self.strides}
        missing = [s for s in self.strides if s not in self.layers.values()]
        if missing:
            raise ValueError(f'attention_maps: no cross-attention layer in {list(places)} works '
                             f'at image stride(s) {missing}; there they work at '
                             f'{sorted(set(available.values()))}.')
        self._records: List[Tuple[str, torch.Tensor]] = []
        self._attention = {name: unet.get_submodule(name) for name in self.layers}

    @property
    def channels(self) -> int:
        return self.tokens * len(self.strides)

    def _hooks(self, name: str, attention) -> list:
        """Forward hooks that record ``attention``'s probabilities, averaged over heads."""
        projected = {}

        def keep(kind):
            return lambda _module, _inputs, output: projected.__setitem__(kind, output)

        def record(_module, _inputs, _output):
            query = attention.head_to_batch_dim(projected.pop('query'))
            key = attention.head_to_batch_dim(projected.pop('key'))
            probs = attention.get_attention_scores(query, key, None)
            self._records.append(
                (name, probs.view(-1, attention.heads, *probs.shape[1:]).mean(dim=1)))

        return [attention.to_q.register_forward_hook(keep('query')),
                attention.to_k.register_forward_hook(keep('key')),
                attention.register_forward_hook(record)]

    @contextmanager
    def recording(self):
        """Within the block, every pass through the chosen layers records their maps."""
        self._records.clear()
        handles = [h for name, attention in self._attention.items()
                   for h in self._hooks(name, attention)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._records.clear()

    def aggregate(self, latent_hw: Tuple[int, int]) -> torch.Tensor:
        """(N, tokens * len(strides), h, w) at the latent's resolution, from the maps
        recorded in the current :meth:`recording` block."""
        groups: Dict[int, List[torch.Tensor]] = {s: [] for s in self.strides}
        height, width = latent_hw
        for name, probs in self._records:
            scale = self.layers[name] // self.vae_factor
            if probs.shape[-1] < self.tokens:
                raise ValueError(f'attention_maps keeps {self.tokens} tokens but the prompt '
                                 f'has {probs.shape[-1]}.')
            maps = probs[..., :self.tokens].transpose(1, 2).reshape(
                probs.shape[0], self.tokens, height // scale, width // scale)
            groups[self.layers[name]].append(maps)
        return torch.cat([F.interpolate(torch.stack(groups[s]).mean(dim=0), size=latent_hw,
                                        mode='nearest') for s in self.strides], dim=1)

