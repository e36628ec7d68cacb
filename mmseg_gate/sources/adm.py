"""ADM (guided-diffusion) features, DDPM-segmentation's way, on diffusers' ``UNet2DModel``.

The label-scarce benchmark's features come from guided-diffusion's unconditional LSUN
256x256 ADMs (``lsun_bedroom.pt``, ``lsun_horse.pt``; the GATE authors concatenate them with
their Stable Diffusion features). diffusers' ``UNet2DModel`` has the same architecture
(scale-shift norm, resblock up/down sampling, attention with 64-channel heads), so the
checkpoint is mapped onto it here, every tensor counted, and diffusers' own forward runs.
guided-diffusion's default ``QKVAttentionLegacy`` stores ``qkv`` per head as
(heads, 3, head_channels), not as (3, heads, head_channels): each head's q, k and v are taken
from its own slice (a plain three-way split would scramble multi-head attention).

DDPM-segmentation's extraction (``src/feature_extractors.py``, ``train_interpreter.py``): the
image in [-1, 1] is noised to each step with one shared noise (``share_noise``: one
(1, 3, 256, 256) draw from the seed, the same for every image and step), the UNet runs on the
unscaled step, and forward hooks keep the outputs of chosen ``output_blocks``: blocks 5, 6,
7, 8, 12 at steps 50, 150, 250 in every ``experiments/*/ddpm.json`` since its commit c491672
(2022; the first versions used 6, 7, 8, 9 at 50, 150, 250, 350), also the GATE authors' set
(``--ddpm_feature_len 2816`` per step).
Each step is one variant here, so GATE's amalgamation weighs the steps as it weighs guided
variants.
"""
import os.path as osp
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ..engine.checkpoint import read_checkpoint
from ..engine.devices import resolve_dtype
from ..fileio import read_safetensors
from .base import (SOURCES, FeatureSource, Features, check_ensemble_size, input_stride,
                   mean_over_draws, move_frozen, refuse_renamed)
from .common.latents import Noise, draw_noise, ensemble_noise, noised
from .common.loading import check_finite
from .common.taps import UNetTaps
from .common.timesteps import check_timesteps

# guided-diffusion's arguments of DDPM-segmentation's LSUN models (its README's MODEL_FLAGS).
ADM_LSUN_256 = dict(image_size=256, model_channels=256, num_res_blocks=2,
                    channel_mult=(1, 1, 2, 2, 4, 4), attention_resolutions=(32, 16, 8),
                    num_head_channels=64, learn_sigma=True)
GATE_BLOCKS = (5, 6, 7, 8, 12)  # the GATE authors' 2,816 channels
GATE_STEPS = (50, 150, 250)
_GET_CHECKPOINTS = (
    "Get DDPM-segmentation's checkpoints with `bash checkpoints/ddpm/download_checkpoint.sh "
    "lsun_horse` (or lsun_bedroom) from https://github.com/yandex-research/ddpm-segmentation, "
    'or guided-diffusion\'s README links (lsun_horse.pt, lsun_bedroom.pt).')


def attention_levels(image_size: int, channel_mult: Sequence[int],
                     attention_resolutions: Sequence[int]) -> List[bool]:
    """Whether each level has attention (guided-diffusion's scripts list the resolutions)."""
    return [image_size // 2**level in attention_resolutions
            for level in range(len(channel_mult))]


def diffusers_config(image_size: int, model_channels: int, num_res_blocks: int,
                     channel_mult: Sequence[int], attention_resolutions: Sequence[int],
                     num_head_channels: int, learn_sigma: bool = True) -> Dict:
    """``UNet2DModel`` arguments of an unconditional guided-diffusion UNet."""
    attention = attention_levels(image_size, channel_mult, attention_resolutions)
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


# -- the key map -------------------------------------------------------------------------
# One plan, read both ways: (diffusers prefix, guided-diffusion prefix, kind). Kinds: 'same'
# (weight and bias as they are), 'squeeze' (a 1x1 conv1d as a linear), 'qkv' (one legacy
# conv1d as to_q, to_k, to_v), 'optional' ('same' where the layer exists: a resnet's skip).
Plan = List[Tuple[str, str, str]]
_RESNET = (('norm1', 'in_layers.0'), ('conv1', 'in_layers.2'),
           ('time_emb_proj', 'emb_layers.1'), ('norm2', 'out_layers.0'),
           ('conv2', 'out_layers.3'))


def _resnet(new: str, old: str) -> Plan:
    return [(f'{new}.{a}', f'{old}.{b}', 'same') for a, b in _RESNET] + \
        [(f'{new}.conv_shortcut', f'{old}.skip_connection', 'optional')]


def _attention(new: str, old: str) -> Plan:
    return [(f'{new}.group_norm', f'{old}.norm', 'same'), (new, f'{old}.qkv', 'qkv'),
            (f'{new}.to_out.0', f'{old}.proj_out', 'squeeze')]


def output_block_modules(num_res_blocks: int, levels: Sequence[bool]) -> List[str]:
    """The ``UNet2DModel`` module whose output is guided-diffusion's ``output_blocks[i]``, for
    every i: the up block's upsampler after its last layer, else its attention or resnet."""
    names = []
    for up, has_attention in enumerate(reversed(levels)):
        for j in range(num_res_blocks + 1):
            if j == num_res_blocks and up != len(levels) - 1:
                names.append(f'up_blocks.{up}.upsamplers.0')
            else:
                kind = 'attentions' if has_attention else 'resnets'
                names.append(f'up_blocks.{up}.{kind}.{j}')
    return names


def key_plan(num_res_blocks: int, levels: Sequence[bool]) -> Plan:
    """Every layer of the UNet, diffusers' name beside guided-diffusion's."""
    plan: Plan = [('time_embedding.linear_1', 'time_embed.0', 'same'),
                  ('time_embedding.linear_2', 'time_embed.2', 'same'),
                  ('conv_in', 'input_blocks.0.0', 'same')]
    block = 1
    for level, has_attention in enumerate(levels):
        for j in range(num_res_blocks):
            plan += _resnet(f'down_blocks.{level}.resnets.{j}', f'input_blocks.{block}.0')
            if has_attention:
                plan += _attention(f'down_blocks.{level}.attentions.{j}',
                                   f'input_blocks.{block}.1')
            block += 1
        if level != len(levels) - 1:
            plan += _resnet(f'down_blocks.{level}.downsamplers.0', f'input_blocks.{block}.0')
            block += 1
    plan += _resnet('mid_block.resnets.0', 'middle_block.0')
    plan += _attention('mid_block.attentions.0', 'middle_block.1')
    plan += _resnet('mid_block.resnets.1', 'middle_block.2')
    block = 0
    for up, has_attention in enumerate(reversed(levels)):
        for j in range(num_res_blocks + 1):
            plan += _resnet(f'up_blocks.{up}.resnets.{j}', f'output_blocks.{block}.0')
            if has_attention:
                plan += _attention(f'up_blocks.{up}.attentions.{j}', f'output_blocks.{block}.1')
            block += 1
        if up != len(levels) - 1:
            plan += _resnet(f'up_blocks.{up}.upsamplers.0',
                            f'output_blocks.{block - 1}.{2 if has_attention else 1}')
    return plan + [('conv_norm_out', 'out.0', 'same'), ('conv_out', 'out.2', 'same')]


def convert_state_dict(state_dict: Dict[str, torch.Tensor], num_res_blocks: int,
                       levels: Sequence[bool], num_head_channels: int,
                       where: str = 'the checkpoint') -> Dict[str, torch.Tensor]:
    """A guided-diffusion UNet state dict as ``UNet2DModel``'s. A tensor the plan does not
    place, or one it needs and lacks, is an error naming ``where``."""
    target, used = {}, set()

    def take(name):
        if name not in state_dict:
            raise ValueError(f"{where} lacks '{name}': not an unconditional ADM with "
                             f'{num_res_blocks} resblocks per level and attention at levels '
                             f'{[i for i, a in enumerate(levels) if a]}.')
        used.add(name)
        return state_dict[name]

    for new, old, kind in key_plan(num_res_blocks, levels):
        if kind == 'optional' and f'{old}.weight' not in state_dict:
            continue
        weight, bias = take(f'{old}.weight'), take(f'{old}.bias')
        if kind == 'qkv':
            channels = weight.shape[1]
            heads = channels // num_head_channels
            weight = weight[..., 0].view(heads, 3, num_head_channels, channels)
            bias = bias.view(heads, 3, num_head_channels)
            for index, name in enumerate(('to_q', 'to_k', 'to_v')):
                target[f'{new}.{name}.weight'] = weight[:, index].reshape(channels, channels)
                target[f'{new}.{name}.bias'] = bias[:, index].reshape(channels)
            continue
        target[f'{new}.weight'] = weight[..., 0] if kind == 'squeeze' else weight
        target[f'{new}.bias'] = bias
    unused = sorted(set(state_dict) - used)
    if unused:
        raise ValueError(f'{len(unused)} tensors of {where} have no place in the ADM UNet '
                         f'(e.g. {unused[:3]}): another architecture, or a class-conditional '
                         'model (label_emb), which DDPM-segmentation does not use.')
    return target


def guided_diffusion_state_dict(unet: UNet2DModel, num_res_blocks: int,
                                levels: Sequence[bool], num_head_channels: int
                                ) -> Dict[str, torch.Tensor]:
    """The inverse: a ``UNet2DModel``'s weights in guided-diffusion's layout (the demo writes
    its tiny ADM checkpoint in the real format with it)."""
    source, state = {}, unet.state_dict()
    for new, old, kind in key_plan(num_res_blocks, levels):
        if kind == 'optional' and f'{new}.weight' not in state:
            continue
        if kind == 'qkv':
            weights = [state[f'{new}.{n}.weight'] for n in ('to_q', 'to_k', 'to_v')]
            biases = [state[f'{new}.{n}.bias'] for n in ('to_q', 'to_k', 'to_v')]
            channels = weights[0].shape[1]
            heads = channels // num_head_channels
            source[f'{old}.weight'] = torch.stack(
                [w.view(heads, num_head_channels, channels) for w in weights],
                dim=1).reshape(3 * channels, channels, 1).clone()
            source[f'{old}.bias'] = torch.stack(
                [b.view(heads, num_head_channels) for b in biases], dim=1).reshape(-1).clone()
            continue
        weight = state[f'{new}.weight']
        source[f'{old}.weight'] = (weight[..., None] if kind == 'squeeze' else weight).clone()
        source[f'{old}.bias'] = state[f'{new}.bias'].clone()
    return source


def read_adm_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """A guided-diffusion state dict from ``.pt``/``.pth`` (``torch.load(weights_only=True)``:
    tensors only, nothing runs) or ``.safetensors``."""
    path = osp.expanduser(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f"ADM checkpoint '{path}' does not exist. {_GET_CHECKPOINTS}")
    if path.endswith('.safetensors'):
        return read_safetensors(path, 'ADM checkpoint', _GET_CHECKPOINTS)
    state = read_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"'{path}' is not a guided-diffusion UNet state dict (a dict of "
                         f'tensors). {_GET_CHECKPOINTS}')
    return state


def load_adm(path: str, architecture: Dict) -> UNet2DModel:
    """The checkpoint at ``path`` (guided-diffusion arguments ``architecture``) as a diffusers
    ``UNet2DModel``, every tensor of the file in place and every parameter from the file."""
    levels = attention_levels(architecture['image_size'], architecture['channel_mult'],
                              architecture['attention_resolutions'])
    where = f"ADM checkpoint '{path}'"
    weights = convert_state_dict(read_adm_checkpoint(path), architecture['num_res_blocks'],
                                 levels, architecture['num_head_channels'], where)
    unet = UNet2DModel(**diffusers_config(**architecture))
    try:
        unet.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(f'{where} does not fit the ADM architecture {architecture} '
                         f'({str(err).splitlines()[0]}...): pass its own guided-diffusion '
                         'arguments as `architecture=dict(...)`.') from err
    check_finite(unet, path)
    return unet.eval().requires_grad_(False)


def output_block_indices(taps: Sequence[Union[int, str]], count: int) -> List[int]:
    """``output_blocks`` indices of ``taps`` given as indices or ``'output_blocks.<i>'``."""
    indices = []
    for tap in taps:
        name = str(tap)
        index = name[len('output_blocks.'):] if name.startswith('output_blocks.') else name
        if not index.isdigit() or not int(index) < count:
            raise ValueError(f'ADMSource tap {tap!r}: this ADM has output_blocks 0..{count - 1} '
                             "(taps as indices or 'output_blocks.<i>').")
        indices.append(int(index))
    if not indices:
        raise ValueError('ADMSource needs a tap, e.g. taps=(5, 6, 7, 8, 12).')
    return indices


@SOURCES.register_module()
class ADMSource(FeatureSource):
    """DDPM-segmentation's ADM features: ``output_blocks`` activations at several steps,
    one variant per step.

    Args:
        model (str): a guided-diffusion UNet checkpoint (``lsun_horse.pt``,
            ``lsun_bedroom.pt``: read with ``torch.load(weights_only=True)``), or the same
            tensors as ``.safetensors``.
        architecture (dict): its guided-diffusion arguments. Default: :data:`ADM_LSUN_256`.
        taps (Sequence[int | str]): guided-diffusion's ``output_blocks`` to read, as indices
            or names ``'output_blocks.<i>'`` (the features' names). Default: the GATE
            authors' (5, 6, 7, 8, 12).
        steps (Sequence[int]): diffusion steps, one variant each. Default: (50, 150, 250).
        input_scale (float): the ADM sees the input resized by this factor (antialiased
            bilinear); 0.5 gives it 256x256 from a 512x512 Stable Diffusion pipeline.
            Strides are in input pixels. Default: 1.0.
        share_noise (bool): one noise for every image and step, drawn from ``noise_seed``
            (DDPM-segmentation's ``share_noise``); else each call's generator draws per
            image. Default: True.
        noise_seed (int): seed of the shared noise (DDPM-segmentation's ``seed``: 0).
        num_train_steps (int): length of the linear beta schedule. Default: 1000.
        frozen_dtype (str): 'auto' (float16 on accelerators, float32 on the CPU),
            'float32', 'float16' or 'bfloat16'. Default: 'auto'.
        ensemble_size (int): noise draws averaged per image (with ``share_noise=False``).
            Default: 1.

    Renamed arguments (refused, naming the new one): ``checkpoint`` -> ``model``, ``blocks``
    -> ``taps``; the architecture, once ``model=dict(...)``, is ``architecture``.
    """

    def __init__(self, model: Optional[str] = None, architecture: Optional[Dict] = None,
                 taps: Sequence[Union[int, str]] = GATE_BLOCKS,
                 steps: Sequence[int] = GATE_STEPS, input_scale: float = 1.0,
                 share_noise: bool = True, noise_seed: int = 0, num_train_steps: int = 1000,
                 frozen_dtype: str = 'auto', ensemble_size: int = 1, **renamed):
        refuse_renamed('ADMSource', renamed, dict(checkpoint='model', blocks='taps'))
        if isinstance(model, dict):
            raise TypeError('ADMSource: `model` is the checkpoint file now (as every source '
                            'calls its weights); pass the guided-diffusion arguments as '
                            '`architecture=dict(...)`.')
        if model is None:
            raise TypeError("ADMSource needs `model`: the checkpoint file, e.g. "
                            "'checkpoints/ddpm/lsun_horse.pt'.")
        self.architecture = dict(ADM_LSUN_256, **(architecture or {}))
        self.ensemble_size = check_ensemble_size(ensemble_size, 'ADMSource')
        if self.ensemble_size > 1 and share_noise:
            raise ValueError('ADMSource: an ensemble (ensemble_size > 1) averages several '
                             'noise draws per image; with share_noise=True every draw is the '
                             'one shared noise. Set share_noise=False.')
        resolve_dtype(frozen_dtype, torch.device('cpu'))  # validate before loading
        if not steps:
            raise ValueError('ADMSource needs at least one step, e.g. steps=(50, 150, 250).')
        self.steps = [check_timesteps(t, None, num_train_steps, 'ADMSource: ')[0]
                      for t in steps]
        arch = self.architecture
        levels = attention_levels(arch['image_size'], arch['channel_mult'],
                                  arch['attention_resolutions'])
        modules = output_block_modules(arch['num_res_blocks'], levels)
        self.blocks = output_block_indices(taps, len(modules))
        self.model, self.input_scale = model, float(input_scale)
        self.unet = load_adm(model, arch)
        self.unet_taps = UNetTaps(self.unet, [modules[b] for b in self.blocks])
        self.prune_after_last_tap()
        scale = 1000 / num_train_steps  # guided-diffusion's linear schedule for any length
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_steps,
                                       beta_schedule='linear', beta_start=scale * 1e-4,
                                       beta_end=scale * 0.02)
        self.num_train_steps = num_train_steps
        self.size_multiple = 2**(len(arch['channel_mult']) - 1)
        self.share_noise, self.noise_seed, self.dtype_name = share_noise, noise_seed, \
            frozen_dtype
        self.device, self.dtype = torch.device('cpu'), torch.float32
        self.counts: Counter = Counter()
        self.feature_info = self._probe()

    def prune_after_last_tap(self) -> List[str]:
        """The output blocks after the last one read, and the output head."""
        return self.unet_taps.prune_after_last_tap()

    def __repr__(self) -> str:
        return (f'ADMSource({self.model!r}, taps {self.blocks}, steps {self.steps}, '
                f'input_scale {self.input_scale})')

    @property
    def variant_names(self) -> List[str]:
        return [f'ADM t={t}' for t in self.steps]

    def to(self, device) -> 'ADMSource':
        move_frozen(self, [self.unet], device)
        return self

    def check_timestep(self, timestep: Optional[int]) -> None:
        if timestep is not None:
            check_timesteps(timestep, None, self.num_train_steps, 'ADMSource: ')

    def noise(self, shape, generator: Optional[Noise]) -> torch.Tensor:
        """The noise of a call: one shared draw (expanded over the images), or one per
        image from the call's generator."""
        if self.share_noise:
            one = draw_noise((1, *shape[1:]), torch.Generator().manual_seed(self.noise_seed))
            return one.expand(shape)
        return draw_noise(shape, generator if generator is not None else
                          torch.Generator().manual_seed(self.noise_seed))

    def _extract(self, pixels: torch.Tensor, timestep: Optional[int],
                 generator: Optional[Noise]) -> List[Features]:
        """Per step (or at ``timestep`` for every variant; 0: the clean image) a dict
        ``'output_blocks.<i>'`` -> (N, C, h, w)."""
        steps = self.steps if timestep is None else [int(timestep)] * len(self.steps)
        draws = self.ensemble_size  # each image repeated, one noise draw each
        if draws > 1:
            pixels = pixels.repeat_interleave(draws, 0)
            generator = ensemble_noise(generator, draws)
        noise = self.noise(pixels.shape, generator) if any(steps) else None
        self.counts['noise_samples'] += pixels.shape[0] if noise is not None else 0
        samples = [pixels if t == 0 else noised(self.scheduler, pixels, t, noise)
                   for t in steps]
        batch = torch.cat(samples).to(self.dtype)
        times = torch.tensor(steps, device=self.device).repeat_interleave(pixels.shape[0])
        self.counts['unet_passes'] += batch.shape[0]
        out = self.unet_taps.run(batch, times)
        num = pixels.shape[0]
        return [{f'output_blocks.{b}': mean_over_draws(out[tap][v * num:(v + 1) * num], draws)
                 for b, tap in zip(self.blocks, self.unet_taps.taps)}
                for v in range(len(steps))]

    def _probe(self) -> List[dict]:
        size = self.size_multiple
        out = self.unet_taps.run(torch.zeros(1, 3, size, size), torch.tensor([self.steps[0]]))
        return [dict(module=f'output_blocks.{block}', num_chs=out[tap].shape[1],
                     reduction=input_stride(size / out[tap].shape[-1], self.input_scale,
                                            f'output_blocks.{block}'),
                     num_variants=len(self.steps))
                for block, tap in zip(self.blocks, self.unet_taps.taps)]
