"""ADM (guided-diffusion) checkpoints as diffusers ``UNet2DModel``s -- work in progress.

DDPM-segmentation's features come from guided-diffusion's LSUN 256x256 ADM
(``lsun_bedroom.pt``, ``lsun_horse.pt``). diffusers' ``UNet2DModel`` has the same
architecture (scale-shift norm, resblock up/down, attention with 64-channel heads); this
module maps a guided-diffusion state dict onto it, every tensor counted. guided-diffusion's
default ``QKVAttentionLegacy`` stores ``qkv`` per head as (heads, 3, head_channels), not as
(3, heads, head_channels): each head's q, k and v are taken from its own slice.
"""
from typing import Dict, Sequence

import torch

# guided-diffusion's arguments of DDPM-segmentation's LSUN models (its README).
ADM_LSUN_256 = dict(image_size=256, model_channels=256, num_res_blocks=2,
                    channel_mult=(1, 1, 2, 2, 4, 4), attention_resolutions=(32, 16, 8),
                    num_head_channels=64, learn_sigma=True)


def diffusers_config(image_size: int, model_channels: int, num_res_blocks: int,
                     channel_mult: Sequence[int], attention_resolutions: Sequence[int],
                     num_head_channels: int, learn_sigma: bool = True) -> Dict:
    """``UNet2DModel`` arguments of a guided-diffusion UNet (resolutions as its scripts give
    them: attention where ``image_size // 2**level`` is listed)."""
    attention = [image_size // 2**level in attention_resolutions
                 for level in range(len(channel_mult))]
    return dict(
        sample_size=image_size, in_channels=3, out_channels=6 if learn_sigma else 3,
        layers_per_block=num_res_blocks,
        block_out_channels=[model_channels * m for m in channel_mult],
        down_block_types=['AttnDownBlock2D' if a else 'ResnetDownsampleBlock2D'
                          for a in attention],
        up_block_types=['AttnUpBlock2D' if a else 'ResnetUpsampleBlock2D'
                        for a in reversed(attention)],
        attention_head_dim=num_head_channels, resnet_time_scale_shift='scale_shift',
        downsample_type='resnet', upsample_type='resnet', attn_norm_num_groups=32,
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)


class _Mapper:
    """Copies guided-diffusion tensors to diffusers names, each source tensor once."""

    def __init__(self, source: Dict[str, torch.Tensor], head_channels: int):
        self.source, self.head_channels, self.target, self.used = source, head_channels, {}, set()

    def take(self, name: str) -> torch.Tensor:
        self.used.add(name)
        return self.source[name]

    def copy(self, new: str, old: str) -> None:
        for suffix in ('weight', 'bias'):
            self.target[f'{new}.{suffix}'] = self.take(f'{old}.{suffix}')

    def resnet(self, new: str, old: str) -> None:
        for a, b in (('norm1', 'in_layers.0'), ('conv1', 'in_layers.2'),
                     ('time_emb_proj', 'emb_layers.1'), ('norm2', 'out_layers.0'),
                     ('conv2', 'out_layers.3')):
            self.copy(f'{new}.{a}', f'{old}.{b}')
        if f'{old}.skip_connection.weight' in self.source:
            self.copy(f'{new}.conv_shortcut', f'{old}.skip_connection')

    def attention(self, new: str, old: str) -> None:
        self.copy(f'{new}.group_norm', f'{old}.norm')
        weight, bias = self.take(f'{old}.qkv.weight')[..., 0], self.take(f'{old}.qkv.bias')
        channels = weight.shape[1]
        heads = channels // self.head_channels
        weight = weight.view(heads, 3, self.head_channels, channels)  # the legacy order
        bias = bias.view(heads, 3, self.head_channels)
        for index, name in enumerate(('to_q', 'to_k', 'to_v')):
            self.target[f'{new}.{name}.weight'] = weight[:, index].reshape(channels, channels)
            self.target[f'{new}.{name}.bias'] = bias[:, index].reshape(channels)
        self.target[f'{new}.to_out.0.weight'] = self.take(f'{old}.proj_out.weight')[..., 0]
        self.target[f'{new}.to_out.0.bias'] = self.take(f'{old}.proj_out.bias')


def convert_state_dict(state_dict: Dict[str, torch.Tensor], num_res_blocks: int,
                       channel_mult: Sequence[int], attention_levels: Sequence[bool],
                       num_head_channels: int, where: str = 'the checkpoint') -> Dict:
    """A guided-diffusion UNet state dict as ``UNet2DModel``'s; a tensor of the source left
    unused is an error naming ``where``."""
    m = _Mapper(state_dict, num_head_channels)
    m.copy('time_embedding.linear_1', 'time_embed.0')
    m.copy('time_embedding.linear_2', 'time_embed.2')
    m.copy('conv_in', 'input_blocks.0.0')
    block, levels = 1, len(channel_mult)
    for level in range(levels):
        for j in range(num_res_blocks):
            m.resnet(f'down_blocks.{level}.resnets.{j}', f'input_blocks.{block}.0')
            if attention_levels[level]:
                m.attention(f'down_blocks.{level}.attentions.{j}', f'input_blocks.{block}.1')
            block += 1
        if level != levels - 1:
            m.resnet(f'down_blocks.{level}.downsamplers.0', f'input_blocks.{block}.0')
            block += 1
    m.resnet('mid_block.resnets.0', 'middle_block.0')
    m.attention('mid_block.attentions.0', 'middle_block.1')
    m.resnet('mid_block.resnets.1', 'middle_block.2')
    block = 0
    for up in range(levels):
        has_attention = attention_levels[levels - 1 - up]
        for j in range(num_res_blocks + 1):
            m.resnet(f'up_blocks.{up}.resnets.{j}', f'output_blocks.{block}.0')
            if has_attention:
                m.attention(f'up_blocks.{up}.attentions.{j}', f'output_blocks.{block}.1')
            block += 1
        if up != levels - 1:
            m.resnet(f'up_blocks.{up}.upsamplers.0',
                     f'output_blocks.{block - 1}.{2 if has_attention else 1}')
    m.copy('conv_norm_out', 'out.0')
    m.copy('conv_out', 'out.2')
    unused = sorted(set(state_dict) - m.used)
    if unused:
        raise ValueError(f'{len(unused)} tensors of {where} have no place in the ADM UNet '
                         f'(e.g. {unused[:3]}): another architecture or a class-conditional '
                         'model.')
    return m.target
