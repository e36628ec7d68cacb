"""Diffusion transformers written out with random weights in diffusers format: SD3.x and
FLUX.1 at CPU size in their real layouts (joint / double-stream and single-stream blocks,
CLIP-L/G and T5 text encoders, a 16-pixel token stride), saved by the pipelines' own
``save_pretrained`` so they load through the same ``from_pretrained`` path as real weights.
"""
import json
import math
import os
import os.path as osp
import shutil
import tempfile
from typing import Dict

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxControlNetModel,
                       FluxPipeline, FluxTransformer2DModel, SD3ControlNetModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          T5Config, T5EncoderModel, T5TokenizerFast)

from .architectures import TINY_CLIP, TINY_VAE, save_clip_tokenizer

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
    return AutoencoderKL(**dict(TINY_VAE, shift_factor=shift, scaling_factor=scale))


def save_random_sd3(folder: str, seed: int = 0) -> str:
    """A tiny Stable Diffusion 3 pipeline: 3 joint blocks, CLIP-L/G with projections, T5."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, out_channels=4)
    clip = CLIPTextConfig(**TINY_CLIP)
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
            text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_CLIP)),
            tokenizer=save_clip_tokenizer(osp.join(tmp, 'a')),
            text_encoder_2=T5EncoderModel(T5Config(**_TINY_T5)),
            tokenizer_2=save_t5_tokenizer(osp.join(tmp, 'b')), transformer=transformer)
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# The real architectures, from the models' diffusers configs (SD3.5-medium, FLUX.1-dev).
_CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, projection_dim=768, hidden_act='quick_gelu')
_CLIP_G_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                    num_attention_heads=20, projection_dim=1280, hidden_act='gelu')
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
               num_heads=64, feed_forward_proj='gated-gelu', relative_attention_num_buckets=32)
_DIT_VAE = dict(down_block_types=('DownEncoderBlock2D', ) * 4,
                up_block_types=('UpDecoderBlock2D', ) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=16, in_channels=3, out_channels=3,
                norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                use_post_quant_conv=False)
DIT_ARCHITECTURES: Dict[str, dict] = {
    'sd35': dict(  # stabilityai/stable-diffusion-3.5-medium (MMDiT-X)
        kind='sd3',
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24,
                         joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm='rms_norm'),
        vae=dict(_DIT_VAE, shift_factor=0.0609, scaling_factor=1.5305),
        scheduler=dict(shift=3.0),
        text_encoders=dict(text_encoder=(CLIPTextModelWithProjection, _CLIP_L_TEXT),
                           text_encoder_2=(CLIPTextModelWithProjection, _CLIP_G_TEXT),
                           text_encoder_3=(T5EncoderModel, _T5_XXL))),
    'flux': dict(  # black-forest-labs/FLUX.1-dev
        kind='flux',
        transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                         attention_head_dim=128, num_attention_heads=24,
                         joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        vae=dict(_DIT_VAE, shift_factor=0.1159, scaling_factor=0.3611),
        scheduler=dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096),
        text_encoders=dict(text_encoder=(CLIPTextModel, _CLIP_L_TEXT),
                           text_encoder_2=(T5EncoderModel, _T5_XXL))),
}
# The same layouts at CPU size (the shipped configs' taps exist; 1 MB shards), for tests.
_TINY_DIT_VAE = dict(_DIT_VAE, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                     norm_num_groups=8)
_TINY_T5_TEXT = dict(_T5_XXL, d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
DIT_ARCHITECTURES['tiny-sd35'] = dict(
    DIT_ARCHITECTURES['sd35'], shard_bytes=2**20,
    transformer=dict(DIT_ARCHITECTURES['sd35']['transformer'], attention_head_dim=8,
                     num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                     pooled_projection_dim=64, sample_size=32),
    vae=dict(_TINY_DIT_VAE, shift_factor=0.0609, scaling_factor=1.5305),
    text_encoders=dict(text_encoder=(CLIPTextModelWithProjection, TINY_CLIP),
                       text_encoder_2=(CLIPTextModelWithProjection, TINY_CLIP),
                       text_encoder_3=(T5EncoderModel, _TINY_T5_TEXT)))
DIT_ARCHITECTURES['tiny-flux'] = dict(
    DIT_ARCHITECTURES['flux'], shard_bytes=2**20,
    transformer=dict(DIT_ARCHITECTURES['flux']['transformer'], attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                     axes_dims_rope=(4, 6, 6)),
    vae=dict(_TINY_DIT_VAE, shift_factor=0.1159, scaling_factor=0.3611),
    text_encoders=dict(text_encoder=(CLIPTextModel, TINY_CLIP),
                       text_encoder_2=(T5EncoderModel, _TINY_T5_TEXT)))


def parameter_count(model_class, config) -> int:
    """Parameters of a model built on the meta device: its size, with no memory used."""
    with torch.device('meta'):
        model = model_class(config)
    return sum(p.numel() for p in model.parameters())


def text_encoder_sizes(arch: str) -> Dict[str, int]:
    """The real text encoders' parameters (CLIP-L/G, T5-XXL: 4.76B), counted on meta."""
    return {name: parameter_count(cls, _text_config(cls, cfg)) for name, (cls, cfg) in
            DIT_ARCHITECTURES[arch]['text_encoders'].items()}


def _text_config(cls, cfg):
    return T5Config(**cfg) if cls is T5EncoderModel else CLIPTextConfig(**cfg)


def _reduced(cls, cfg):
    """A text encoder of the real widths (its embeddings have the real shapes) with one
    layer: prompts are encoded once and the encoders dropped, so their depth changes no
    per-image figure."""
    if cls is T5EncoderModel:
        return cls(T5Config(**dict(cfg, vocab_size=len(_T5_WORDS), num_layers=1, d_ff=64)))
    return cls(CLIPTextConfig(**dict(cfg, num_hidden_layers=1, intermediate_size=64)))


def write_random_safetensors(model_class, config: dict, folder: str, dtype: torch.dtype,
                             seed: int = 0, shard_bytes: int = 5 * 2**30) -> None:
    """A model's random weights written shard by shard in diffusers' sharded layout
    (``config.json``, ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` and the index),
    never holding the model: FLUX.1-dev's 12B parameters are 24 GB in bfloat16. Norm scales
    are 1, biases 0, the rest N(0, 0.02)."""
    from safetensors.torch import save_file
    with torch.device('meta'):
        model = model_class(**config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    sizes = {k: math.prod(shape) * torch.finfo(dtype).bits // 8 for k, shape in shapes.items()}
    shards, size = [[]], 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    os.makedirs(folder, exist_ok=True)
    model.save_config(folder)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f'diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
        tensors = {}
        for name in names:
            shape = shapes[name]
            if len(shape) == 1 and 'norm' in name and name.endswith('weight'):
                tensors[name] = torch.ones(shape, dtype=dtype)
            elif name.endswith('bias'):
                tensors[name] = torch.zeros(shape, dtype=dtype)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            weight_map[name] = file
        save_file(tensors, osp.join(folder, file), metadata=dict(format='pt'))
        del tensors
    with open(osp.join(folder, 'diffusion_pytorch_model.safetensors.index.json'), 'w') as f:
        json.dump(dict(metadata=dict(total_size=sum(sizes.values())), weight_map=weight_map), f)


def save_random_dit(folder: str, arch: str, seed: int = 0,
                    dtype: torch.dtype = torch.bfloat16) -> str:
    """A real-size SD3.5-medium or FLUX.1-dev pipeline folder with random weights: the
    transformer (in ``dtype``) and VAE at their real architectures, the text encoders at their
    real widths with one layer each (:func:`_reduced`; their real sizes are
    :func:`text_encoder_sizes`). The layout (``model_index.json``, subfolders, tokenizers) is
    the pipelines' own ``save_pretrained``'s."""
    spec = DIT_ARCHITECTURES[arch]
    torch.manual_seed(seed)
    tiny = save_random_sd3 if spec['kind'] == 'sd3' else save_random_flux
    pipeline = StableDiffusion3Pipeline if spec['kind'] == 'sd3' else FluxPipeline
    with tempfile.TemporaryDirectory() as tmp:
        parts = pipeline.from_pretrained(tiny(osp.join(tmp, 'tiny'))).components
        for name, (cls, cfg) in spec['text_encoders'].items():
            parts[name] = _reduced(cls, cfg)
        parts['vae'] = AutoencoderKL(**spec['vae'])
        parts['scheduler'] = FlowMatchEulerDiscreteScheduler(**spec['scheduler'])
        pipeline(**parts).save_pretrained(folder, safe_serialization=True)
    transformer_class = SD3Transformer2DModel if spec['kind'] == 'sd3' \
        else FluxTransformer2DModel
    target = osp.join(folder, 'transformer')
    shutil.rmtree(target)
    write_random_safetensors(transformer_class, spec['transformer'], target, dtype, seed,
                             spec.get('shard_bytes', 5 * 2**30))
    return folder


# ControlNets of the kinds the DiT source runs (the condition latent alone, InstantX's):
# blocks per stream, as InstantX's SD3 and FLUX.1-dev Canny ControlNets have them (SD3: no
# extra conditioning channels, a zeroed pooled projection).
DIT_CONTROLNET_BLOCKS = dict(
    sd3=dict(num_layers=6, extra_conditioning_channels=0,
             force_zeros_for_pooled_projection=True),
    flux=dict(num_layers=5, num_single_layers=10))


def _init_keywords(model_class, config: dict) -> dict:
    """The entries of ``config`` that ``model_class`` takes."""
    import inspect
    names = inspect.signature(model_class.__init__).parameters
    return {k: v for k, v in config.items() if k in names}


def save_random_dit_controlnet(folder: str, dit_folder: str, seed: int = 0,
                               dtype: torch.dtype = torch.bfloat16) -> str:
    """A random ControlNet (``SD3ControlNetModel`` / ``FluxControlNetModel``) of the DiT
    pipeline in ``dit_folder``, at its transformer's widths with the blocks of
    :data:`DIT_CONTROLNET_BLOCKS`, written shard by shard (:func:`write_random_safetensors`,
    no model held: real sizes fit), so nothing in it is zero."""
    from ..sources.dit import model_classes, read_kind
    kind = read_kind(dit_folder)
    transformer_class, controlnet_class = model_classes(kind)
    config = dict(transformer_class.load_config(dit_folder, subfolder='transformer'),
                  **DIT_CONTROLNET_BLOCKS[kind])
    write_random_safetensors(controlnet_class, _init_keywords(controlnet_class, config), folder,
                             dtype, seed)
    return folder


def save_random_dit_lora(path: str, dit_folder: str, rank: int = 4, seed: int = 0,
                         targets=None) -> str:
    """A random transformer LoRA of the DiT pipeline in ``dit_folder`` (rank = alpha, the
    DiT LoRA recipe's targets unless ``targets``; no factor zero), written as the LoRA
    trainer writes its files (:func:`~mmseg_gate.protocols.dit_lora_training.write_dit_lora`,
    diffusers' ``save_lora_weights``). The transformer is built on the meta device only for
    the layers' shapes: real sizes fit."""
    from peft import LoraConfig, get_peft_model_state_dict

    from ..protocols.dit_lora_training import DIT_TARGETS, write_dit_lora
    from ..sources.dit import model_classes, read_kind
    kind = read_kind(dit_folder)
    transformer_class = model_classes(kind)[0]
    config = transformer_class.load_config(dit_folder, subfolder='transformer')
    with torch.device('meta'):
        transformer = transformer_class.from_config(config)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights='gaussian',
                                       target_modules=list(targets or DIT_TARGETS[kind])))
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(value.shape, generator=generator) *
             (rank**-0.5 if '.lora_A.' in key else 0.02)
             for key, value in get_peft_model_state_dict(transformer).items()}
    return write_dit_lora(path, kind, state, transformer.peft_config['default'].to_dict())
