"""Stable Diffusion 3.x's side of the DiT source: what its transformer and pipeline do their
own way (the rest is ``base.py``'s)."""
from typing import Dict, List

import torch
from diffusers import SD3ControlNetModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import (CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel,
                          T5TokenizerFast)

from ..base import SOURCES
from .base import DiTSource


@SOURCES.register_module()
class SD3Source(DiTSource):
    """Stable Diffusion 3.x transformer features (``SD3Transformer2DModel``): joint blocks,
    CLIP-L, CLIP-G and T5 prompts, a fixed scheduler shift. Arguments as :class:`DiTSource`'s
    (which builds this class for a ``StableDiffusion3Pipeline`` folder)."""

    kind = 'sd3'
    pipeline_class = StableDiffusion3Pipeline
    transformer_class = SD3Transformer2DModel
    controlnet_class = SD3ControlNetModel
    parts = dict(transformer='model', vae='model', scheduler='scheduler', text_encoder='model',
                 text_encoder_2='model', text_encoder_3='model', tokenizer='clip_tokenizer',
                 tokenizer_2='clip_tokenizer', tokenizer_3='t5_tokenizer')
    residual_keys = ('block_controlnet_hidden_states', )

    @staticmethod
    def default_tap(names: List[str], config) -> str:
        """The middle joint block."""
        return names[len(names) // 2]

    # SD3's last joint block differs from the others (no text output): the transformer is
    # built whole and cut after loading (the base's truncated_build and prune_after_last_tap).

    # CLIP-L, CLIP-G (both with projections) and T5, with their tokenizers.
    text_parts = dict(text_encoder=CLIPTextModelWithProjection,
                      text_encoder_2=CLIPTextModelWithProjection, text_encoder_3=T5EncoderModel,
                      tokenizer=CLIPTokenizer, tokenizer_2=CLIPTokenizer,
                      tokenizer_3=T5TokenizerFast)

    @staticmethod
    def prompt_embeddings(pipe, prompt: str, length: Dict) -> Dict[str, torch.Tensor]:
        """The prompt for each of the three encoders, without a negative prompt."""
        out = pipe.encode_prompt(prompt, prompt, prompt, device='cpu',
                                 do_classifier_free_guidance=False, **length)
        return dict(encoder_hidden_states=out[0], pooled_projections=out[2])

    def patch_size(self) -> int:
        """The transformer's own patch embedding."""
        return self.transformer.config.patch_size

    def control_latent(self, name: str, latent: torch.Tensor) -> torch.Tensor:
        """Scaled; shifted unless the ControlNet zeroes its pooled projection (InstantX's),
        as the SD3 ControlNet pipeline treats each kind."""
        shift = 0.0 if self.controlnets[name].config.force_zeros_for_pooled_projection \
            else (self.vae.config.shift_factor or 0.0)
        return (latent - shift) * self.vae.config.scaling_factor

    def controlnet_residuals(self, net, inputs: Dict, condition: torch.Tensor) -> List:
        """The joint blocks' residuals; text states only for a ControlNet that attends to
        them, a zero pooled projection for one that asks for it."""
        pooled = inputs['pooled_projections']
        return [list(net(
            hidden_states=inputs['hidden_states'], timestep=inputs['timestep'],
            controlnet_cond=condition, conditioning_scale=1.0,
            encoder_hidden_states=inputs['encoder_hidden_states']
            if net.config.joint_attention_dim is not None else None,
            pooled_projections=torch.zeros_like(pooled)
            if net.config.force_zeros_for_pooled_projection else pooled,
            return_dict=False)[0])]
