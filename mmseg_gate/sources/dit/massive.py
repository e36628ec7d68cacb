"""Massive activations in diffusion-transformer features, handled as DiTF does.

A few channels of a DiT's residual stream hold values orders of magnitude above the others in
every image token (FLUX.1-dev: channels 154 and 1446 of 3,072), tied to AdaLN: the
transformer itself never reads its residual stream raw, every block first normalises each
token and modulates it with the shift and scale its AdaLN computes from the timestep (and on
FLUX the guidance and the pooled text). Read raw, those channels dominate every cosine
similarity: DiTF (Gan et al., NeurIPS 2025, ``ganchaofan0000/DiTF``) measures FLUX.1-dev on
SPair-71k zero-shot at PCK@0.1 29.9 raw, 65.3 with the AdaLN treatment, 67.1 with the
channels also discarded.

DiTF's treatment (``eval_spair.py``, ``src/flux/modules/layers.py``): take the *input* of
block k (its image tokens), average it over the noise ensemble, zero the massive channels,
LayerNorm each token without affine parameters (eps 1e-6) and modulate it with block k's own
AdaLN, ``(1 + scale) * LN(x) + shift`` (the gate is not used): what block k feeds its
attention, with the massive channels removed. A tap here is a block's *output*, which is the
next block's input, so ``tap_transform='adaln'`` modulates tap ``b`` with the AdaLN of the
block after ``b`` (the final ``norm_out`` after the last block): DiTF's FLUX block "28"
(counted over the 19 double- then the 38 single-stream blocks) is the input of
``single_transformer_blocks.9``, i.e. tap ``'single_transformer_blocks.8'`` modulated by
``single_transformer_blocks.9.norm``. The AdaLN runs as diffusers' own module
(``AdaLayerNormZero`` / ``AdaLayerNormZeroSingle`` / ``SD35AdaLayerNormZeroX``:
shift and scale are its first two chunks; ``AdaLayerNormContinuous`` for ``norm_out``), on
the transformer's own ``temb`` of the pass.

DiTF hard-codes FLUX.1-dev's channels; ``discard_channels='auto'`` finds them for any model
(:func:`massive_channels`): channels whose mean magnitude over the image tokens exceeds
``massive_ratio`` (default 100) times the median channel's, measured once per source on a
fixed probe image.
"""
from typing import List, Sequence

import torch
from diffusers.models.normalization import AdaLayerNormContinuous

# A channel is massive when its mean |activation| over image tokens exceeds this many times
# the median channel's (FLUX.1-dev's two stand thousands of times above it).
MASSIVE_RATIO = 100.0
TAP_TRANSFORMS = ('adaln', 'raw')


def massive_channels(tokens: torch.Tensor, ratio: float = MASSIVE_RATIO) -> List[int]:
    """The channels of image ``tokens`` (N, L, C) whose mean magnitude over all tokens is
    above ``ratio`` times the median channel's."""
    magnitude = tokens.detach().float().abs().mean(dim=(0, 1))
    return torch.nonzero(magnitude > ratio * magnitude.median()).flatten().tolist()


def next_adaln(transformer, names: Sequence[str], tap: str) -> torch.nn.Module:
    """The AdaLN the transformer applies to ``tap``'s output next: the following block's
    (``norm1`` of a joint / double-stream block, ``norm`` of a single-stream one), after the
    last block ``norm_out``."""
    index = list(names).index(tap)
    if index + 1 == len(names):
        return transformer.norm_out
    block = transformer.get_submodule(names[index + 1])
    return block.norm1 if hasattr(block, 'norm1') else block.norm


def modulate(adaln: torch.nn.Module, tokens: torch.Tensor, temb: torch.Tensor
             ) -> torch.Tensor:
    """``(1 + scale) * LayerNorm(tokens) + shift`` with ``adaln``'s shift and scale for
    ``temb`` (N, D): the module's own forward, its modulated tokens only."""
    if isinstance(adaln, AdaLayerNormContinuous):
        return adaln(tokens, temb)
    out = adaln(tokens, emb=temb)
    return out[0] if isinstance(out, tuple) else out


def discard(tokens: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """``tokens`` with ``channels`` zeroed (a copy)."""
    if not channels:
        return tokens
    tokens = tokens.clone()
    tokens[..., list(channels)] = 0
    return tokens
