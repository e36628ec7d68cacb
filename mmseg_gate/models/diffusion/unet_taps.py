"""Reading activations out of a diffusers UNet, running it only as far as the taps need.

A tap is the dotted name of any UNet submodule: a block's output such as
``up_blocks.1.upsamplers.0`` (the paper's segmentation features) or
``up_blocks.2.attentions.1``, or a module inside a transformer block whose output is a token
sequence (``...transformer_blocks.0.attn1``, ``...attn2.to_q``, ``...ff``): those come back as
(N, C, H, W) maps at their block's resolution. The forward below follows diffusers'
``UNet2DConditionModel.forward`` stage by stage (down blocks, mid block, up blocks; SDXL's
added text/time embedding included) and returns right after the last stage that holds a tap, so
``conv_out`` and the remaining up blocks never run (about 25% of SD1.5's FLOPs for the default
taps).
"""
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

STAGE_KINDS = ('down_blocks', 'mid_block', 'up_blocks')


def stage_names(unet) -> List[str]:
    """The UNet's top-level stages in execution order."""
    names = [f'down_blocks.{i}' for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append('mid_block')
    return names + [f'up_blocks.{i}' for i in range(len(unet.up_blocks))]


def stage_of(module_name: str) -> str:
    """The stage holding a submodule: 'up_blocks.2.attentions.0' -> 'up_blocks.2'."""
    parts = module_name.split('.')
    return 'mid_block' if parts[0] == 'mid_block' else '.'.join(parts[:2])


def first_tensor(output):
    """Blocks return a tensor, a tuple (down blocks) or a ``*Output`` dataclass."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


def as_spatial(output: torch.Tensor, latent_hw: Tuple[int, int], name: str) -> torch.Tensor:
    """A (N, C, H, W) map as is; a token sequence (N, h * w, C) of a transformer block as the
    (N, C, h, w) map it flattens (row-major, as diffusers flattens), h and w being the latent
    size halved as often as needed."""
    if output.dim() == 4:
        return output
    if output.dim() == 3:
        num, length, channels = output.shape
        height, width = latent_hw
        scale = 1
        while height % scale == 0 and width % scale == 0:
            if (height // scale) * (width // scale) == length:
                return output.transpose(1, 2).reshape(num, channels, height // scale,
                                                      width // scale)
            scale *= 2
    raise ValueError(
        f"Tap '{name}' returns shape {tuple(output.shape)}, not a spatial map: with a "
        f'{latent_hw[0]}x{latent_hw[1]} latent, a token sequence must have h * w tokens for '
        "the latent or one of its halvings. Cross-attention keys and values ('attn2.to_k', "
        "'attn2.to_v') are text tokens; tap 'attn2.to_q', 'attn1', 'attn2' or 'ff' instead.")


class UNetTaps:
    """Runs ``unet`` up to the last of ``taps`` (and of ``also_run``) and returns their
    activations.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD1.x, SD2.x and SDXL layouts).
        taps: dotted submodule names, in the order the features are wanted.
        also_run: further submodule names the pass must reach (e.g. attention layers whose
            maps are recorded).
    """

    def __init__(self, unet, taps: Sequence[str], also_run: Sequence[str] = ()):
        self.unet = unet
        self.taps = list(taps)
        if not self.taps:
            raise ValueError("`taps` is empty; name at least one UNet module, e.g. "
                             "'up_blocks.1.upsamplers.0'.")
        self._check_supported(unet)
        modules = dict(unet.named_modules())
        stages = stage_names(unet)
        for tap in self.taps:
            if tap not in modules:
                raise KeyError(
                    f"Tap '{tap}' is not a module of this UNet. Taps are dotted submodule "
                    f'names; this UNet has the stages {stages}, and e.g. '
                    "'up_blocks.1.upsamplers.0' or 'up_blocks.2.attentions.0' below them "
                    '(list all with `dict(unet.named_modules())`).')
            if tap.split('.')[0] not in STAGE_KINDS:
                raise KeyError(f"Tap '{tap}' is not inside a down, mid or up block of the UNet "
                               f'(one of {stages}).')
        self._tapped = {tap: modules[tap] for tap in self.taps}
        last = max(stages.index(stage_of(name)) for name in [*self.taps, *also_run])
        self.stages_run = stages[:last + 1]
        self._stages = [(name, unet.get_submodule(name)) for name in self.stages_run]
        self._last_down = max((n for n in stages if n.startswith('down')),
                              key=stages.index)

    def drop_unused_stages(self) -> List[str]:
        """Free the stages after the last one run, and the output head: feature passes never
        need them (SD1.5's default taps: up block 3 and ``conv_out``). The UNet can then no
        longer predict noise. Returns what was dropped."""
        unet, dropped = self.unet, []
        keep = {kind: [n for n in self.stages_run if n.startswith(kind)] for kind in STAGE_KINDS}
        for kind in ('down_blocks', 'up_blocks'):
            blocks = getattr(unet, kind)
            dropped += [f'{kind}.{i}' for i in range(len(keep[kind]), len(blocks))]
            setattr(unet, kind, nn.ModuleList(list(blocks)[:len(keep[kind])]))
        if unet.mid_block is not None and not keep['mid_block']:
            unet.mid_block, dropped = None, dropped + ['mid_block']
        for name in ('conv_norm_out', 'conv_act', 'conv_out'):
            if getattr(unet, name, None) is not None:
                setattr(unet, name, None)
                dropped.append(name)
        return dropped

    @staticmethod
    def _check_supported(unet) -> None:
        config = unet.config
        if config.class_embed_type is not None or \
                config.addition_embed_type not in (None, 'text_time'):
            raise ValueError(
                'UNets with class embeddings or added embeddings other than SDXL\'s text/time '
                'ones (upscalers, Kandinsky) are not supported; use an SD1.x, SD2.x or SDXL '
                f'UNet (got class_embed_type={config.class_embed_type!r}, '
                f'addition_embed_type={config.addition_embed_type!r}).')

    @contextmanager
    def _capture(self, store: Dict[str, torch.Tensor], latent_hw: Tuple[int, int]):
        handles = [
            module.register_forward_hook(
                lambda _m, _i, out, tap=tap: store.__setitem__(
                    tap, as_spatial(first_tensor(out), latent_hw, tap)))
            for tap, module in self._tapped.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def __call__(self,
                 sample: torch.Tensor,
                 timestep,
                 encoder_hidden_states: torch.Tensor,
                 down_block_residuals: Optional[Sequence[torch.Tensor]] = None,
                 mid_block_residual: Optional[torch.Tensor] = None,
                 added_cond_kwargs: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """Activations at ``taps`` for one truncated UNet pass.

        ``down_block_residuals``/``mid_block_residual`` are ControlNet outputs, added where
        diffusers adds them; ``added_cond_kwargs`` holds SDXL's ``text_embeds`` and
        ``time_ids``.
        """
        store: Dict[str, torch.Tensor] = {}
        with self._capture(store, tuple(sample.shape[-2:])):
            self._forward(sample, timestep, encoder_hidden_states, down_block_residuals,
                          mid_block_residual, added_cond_kwargs or {})
        return {tap: store[tap] for tap in self.taps}

    def _forward(self, sample, timestep, encoder_hidden_states, down_block_residuals,
                 mid_block_residual, added_cond_kwargs) -> None:
        unet = self.unet
        # Sizes that do not halve evenly need each skip's size to upsample to.
        uneven = any(dim % 2**unet.num_upsamplers for dim in sample.shape[-2:])
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep))
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                     added_cond_kwargs=added_cond_kwargs)
        if aug_emb is not None:
            emb = emb + aug_emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)

        sample = unet.conv_in(sample)
        skips = (sample, )
        for name, block in self._stages:
            if name.startswith('down_blocks'):
                sample, res = self._run_block(block, sample, emb, context)
                skips += res
                if name == self._last_down and down_block_residuals is not None:
                    skips = tuple(s + r for s, r in zip(skips, down_block_residuals))
            elif name == 'mid_block':
                sample = self._run_block(block, sample, emb, context)
                if mid_block_residual is not None:
                    sample = sample + mid_block_residual
            else:
                res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
                # The final up block has no upsampler (and no skips are left for it).
                upsample_size = skips[-1].shape[2:] if uneven and skips else None
                sample = self._run_block(block, sample, emb, context,
                                         res_hidden_states_tuple=res,
                                         upsample_size=upsample_size)

    @staticmethod
    def _run_block(block: nn.Module, sample, emb, context, **kwargs):
        if getattr(block, 'has_cross_attention', False):
            kwargs['encoder_hidden_states'] = context
        return block(hidden_states=sample, temb=emb, **kwargs)
