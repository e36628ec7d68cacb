"""Reading activations out of a diffusers UNet, running it only as far as the taps need.

A tap is the dotted name of any UNet submodule, e.g. ``up_blocks.1.upsamplers.0`` (the paper's
segmentation features) or ``up_blocks.2.attentions.1``. The forward below follows diffusers'
``UNet2DConditionModel.forward`` stage by stage (down blocks, mid block, up blocks) and returns
right after the last stage that holds a tap, so ``conv_out`` and the remaining up blocks never
run (about 25% of SD1.5's FLOPs for the default taps).
"""
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn


def _stage_names(unet) -> List[str]:
    """The UNet's top-level stages in execution order."""
    names = [f'down_blocks.{i}' for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append('mid_block')
    names += [f'up_blocks.{i}' for i in range(len(unet.up_blocks))]
    return names


def _first_tensor(output):
    """Blocks return a tensor, a tuple (down blocks) or a ``*Output`` dataclass."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


class UNetTaps:
    """Runs ``unet`` up to the last of ``taps`` and returns their activations.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD1.x and SD2.x layouts).
        taps: dotted submodule names, in the order the features are wanted.
    """

    def __init__(self, unet, taps: Sequence[str]):
        self.unet = unet
        self.taps = list(taps)
        if not self.taps:
            raise ValueError('GATEBackbone: `taps` is empty; name at least one UNet module, '
                             "e.g. 'up_blocks.1.upsamplers.0'.")
        self._check_supported(unet)
        modules = dict(unet.named_modules())
        stages = _stage_names(unet)
        for tap in self.taps:
            if tap not in modules:
                raise KeyError(
                    f"GATEBackbone: tap '{tap}' is not a module of this UNet. Taps are dotted "
                    f'submodule names; this UNet has the stages {stages}, and e.g. '
                    f"'up_blocks.1.upsamplers.0' or 'up_blocks.2.attentions.0' below them "
                    '(list all with `dict(unet.named_modules())`).')
        if any(tap.split('.')[0] not in ('down_blocks', 'mid_block', 'up_blocks')
               for tap in self.taps):
            raise KeyError(f'GATEBackbone: taps must lie inside a down, mid or up block of the '
                           f'UNet (one of {stages}); got {self.taps}.')
        last_stage = max(stages.index(self._stage_of(t)) for t in self.taps)
        self.stages_run = stages[:last_stage + 1]

    @staticmethod
    def _stage_of(tap: str) -> str:
        parts = tap.split('.')
        return 'mid_block' if parts[0] == 'mid_block' else '.'.join(parts[:2])

    @staticmethod
    def _check_supported(unet) -> None:
        config = unet.config
        if config.class_embed_type is not None or config.addition_embed_type is not None:
            raise ValueError(
                'GATEBackbone: UNets with class or added embeddings (SDXL, upscalers) are not '
                'supported yet; use an SD1.x/SD2.x UNet '
                f'(got class_embed_type={config.class_embed_type!r}, '
                f'addition_embed_type={config.addition_embed_type!r}).')

    @contextmanager
    def _capture(self, store: Dict[str, torch.Tensor]):
        modules = dict(self.unet.named_modules())
        handles = [
            modules[tap].register_forward_hook(
                lambda _m, _i, out, tap=tap: store.__setitem__(tap, _first_tensor(out)))
            for tap in self.taps
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
                 mid_block_residual: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Activations at ``taps`` for one truncated UNet pass.

        ``down_block_residuals``/``mid_block_residual`` are ControlNet outputs, added where
        diffusers adds them.
        """
        store: Dict[str, torch.Tensor] = {}
        with self._capture(store):
            self._forward(sample, timestep, encoder_hidden_states, down_block_residuals,
                          mid_block_residual)
        return [store[tap] for tap in self.taps]

    def _forward(self, sample, timestep, encoder_hidden_states, down_block_residuals,
                 mid_block_residual) -> None:
        unet = self.unet
        # Sizes that do not halve evenly need each skip's size to upsample to.
        uneven = any(dim % 2**unet.num_upsamplers for dim in sample.shape[-2:])
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep))
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=None)
        stages_left = len(self.stages_run)

        sample = unet.conv_in(sample)
        skips = (sample,)
        for block in unet.down_blocks:
            sample, res = self._run_block(block, sample, emb, context)
            skips += res
            stages_left -= 1
            if stages_left == 0:
                return
        if down_block_residuals is not None:
            skips = tuple(s + r for s, r in zip(skips, down_block_residuals))

        if unet.mid_block is not None:
            sample = self._run_block(unet.mid_block, sample, emb, context)
            if mid_block_residual is not None:
                sample = sample + mid_block_residual
            stages_left -= 1
            if stages_left == 0:
                return

        for i, block in enumerate(unet.up_blocks):
            res = skips[-len(block.resnets):]
            skips = skips[:-len(block.resnets)]
            is_final = i == len(unet.up_blocks) - 1
            upsample_size = skips[-1].shape[2:] if uneven and not is_final else None
            sample = self._run_block(block, sample, emb, context, res_hidden_states_tuple=res,
                                     upsample_size=upsample_size)
            stages_left -= 1
            if stages_left == 0:
                return

    @staticmethod
    def _run_block(block: nn.Module, sample, emb, context, **kwargs):
        if getattr(block, 'has_cross_attention', False):
            kwargs['encoder_hidden_states'] = context
        return block(hidden_states=sample, temb=emb, **kwargs)
