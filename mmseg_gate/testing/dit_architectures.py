"""Diffusion transformers written out with random weights in diffusers format: SD3.x and
FLUX.1 at CPU size in their real layouts (joint / double-stream and single-stream blocks,
CLIP-L/G and T5 text encoders, a 16-pixel token stride), saved by the pipelines' own
``save_pretrained`` so they load through the same ``from_pretrained`` path as real weights.
"""
import os.path as osp
import tempfile

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxControlNetModel,
                       FluxPipeline, FluxTransformer2DModel, SD3ControlNetModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          T5Config, T5EncoderModel, T5TokenizerFast)

from .architectures import _TINY_CLIP, _TINY_VAE, save_clip_tokenizer

_T5_WORDS = ('<pad> </s> <unk> ▁a ▁photo ▁of ▁cat ▁dog ▁horse ▁street ▁high ▁quality ▁, '
             '▁the ▁and ▁').split()
_TINY_T5 = dict(vocab_size=len(_T5_WORDS), d_model=64, d_kv=16, d_ff=64, num_layers=1,
                num_heads=2)


def save_t5_tokenizer(folder: str) -> T5TokenizerFast:
    """A small unigram vocabulary in T5's tokenizer format (T5's own is 32k pieces)."""
    vocab = [(w, 0.0 if i < 3 else -float(i)) for i, w in enumerate(_T5_WORDS)]
    tokenizer = T5TokenizerFast(vocab=vocab, eos_token='</s>', pad_token='<pad>',
                                unk_token='<unk>', extra_ids=0)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _vae(shift: float, scale: float) -> AutoencoderKL:
    return AutoencoderKL(**dict(_TINY_VAE, shift_factor=shift, scaling_factor=scale))


def save_random_sd3(folder: str, seed: int = 0) -> str:
    """A tiny Stable Diffusion 3 pipeline: 3 joint blocks, CLIP-L/G with projections, T5."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, out_channels=4)
    clip = CLIPTextConfig(**_TINY_CLIP)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(0.0609, 1.5305), text_encoder=CLIPTextModelWithProjection(clip),
            tokenizer=save_clip_tokenizer(osp.join(tmp, 'a')),
            text_encoder_2=CLIPTextModelWithProjection(clip),
            tokenizer_2=save_clip_tokenizer(osp.join(tmp, 'b'), pad_token='!'),
            text_encoder_3=T5EncoderModel(T5Config(**_TINY_T5)),
            tokenizer_3=save_t5_tokenizer(osp.join(tmp, 'c')))
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_random_sd3_controlnet(folder: str, sd3_folder: str, seed: int = 0) -> str:
    """An SD3 ControlNet for the tiny SD3 (``SD3ControlNetModel.from_transformer``, 2
    blocks, InstantX's kind: the condition latent alone, zeroed pooled projection) whose
    zero-initialised output layers are not zero (it does something)."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel.from_pretrained(sd3_folder, subfolder='transformer')
    controlnet = SD3ControlNetModel.from_transformer(transformer, num_layers=2,
                                                     num_extra_conditioning_channels=0)
    with torch.no_grad():
        for block in controlnet.controlnet_blocks:
            block.weight.normal_(0, 0.05)
            block.bias.normal_(0, 0.05)
        for param in controlnet.pos_embed_input.parameters():
            param.normal_(0, 0.05)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


def save_random_flux_controlnet(folder: str, flux_folder: str, seed: int = 0) -> str:
    """A FLUX ControlNet for the tiny FLUX (``FluxControlNetModel.from_transformer``: one
    double- and one single-stream block, InstantX's kind) whose zero-initialised layers are
    not zero."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel.from_pretrained(flux_folder, subfolder='transformer')
    config = transformer.config
    controlnet = FluxControlNetModel.from_transformer(
        transformer, num_layers=1, num_single_layers=1,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads)
    with torch.no_grad():
        for layer in (*controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks,
                      controlnet.controlnet_x_embedder):
            layer.weight.normal_(0, 0.05)
            layer.bias.normal_(0, 0.05)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


def save_random_flux(folder: str, seed: int = 0, guidance: bool = True) -> str:
    """A tiny FLUX.1 pipeline: 2 double-stream and 2 single-stream blocks, the guidance
    embedding (FLUX.1-dev's; ``guidance=False``: schnell's layout), CLIP-L and T5."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
        pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = FluxPipeline(
            scheduler=scheduler, vae=_vae(0.1159, 0.3611),
            text_encoder=CLIPTextModel(CLIPTextConfig(**_TINY_CLIP)),
            tokenizer=save_clip_tokenizer(osp.join(tmp, 'a')),
            text_encoder_2=T5EncoderModel(T5Config(**_TINY_T5)),
            tokenizer_2=save_t5_tokenizer(osp.join(tmp, 'b')), transformer=transformer)
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder
