"""Reading activations out of a diffusers UNet, running it only as far as the taps need.

A tap is the dotted name of any UNet submodule: a block's output such as
``up_blocks.1.upsamplers.0`` (the paper's segmentation features) or
``up_blocks.2.attentions.1``, or a module inside a transformer block whose output is a token
sequence (``...transformer_blocks.0.attn1``, ``...attn2.to_q``, ``...ff``): those come back as
(N, C, H, W) maps at their block's resolution. The pass is diffusers' own
``UNet2DConditionModel.forward`` (SDXL's added conditions, ControlNet residuals and whatever
else it takes included); forward hooks read the taps, and a hook on the last stage that holds
one stops the pass right after it, so ``conv_out`` and the remaining up blocks never run (about
25% of SD1.5's FLOPs for the default taps). Nothing of diffusers is copied or replaced: the
hooks are removed after every pass.
"""
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

STAGE_KINDS = ('down_blocks', 'mid_block', 'up_blocks')


class StopForward(Exception):
    """Raised by the hook on the last stage a feature pass needs: the rest never runs."""


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
        if not self.taps and not also_run:
            raise ValueError("`taps` is empty; name at least one UNet module, e.g. "
                             "'up_blocks.1.upsamplers.0' (or read cross-attention maps "
                             'only: taps=() with attention_maps).')
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
        self.dropped: List[str] = []
        # Whole halvings the input needs once stages are freed (diffusers' UNets downsample
        # in every down block but the last).
        self.num_upsamplers = len(unet.down_blocks) - 1

    def prune_after_last_tap(self) -> List[str]:
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
        self.dropped = dropped
        return dropped

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
        """Activations at ``taps`` for one pass of a ``UNet2DConditionModel`` that stops
        after the last stage needed.

        ``down_block_residuals``/``mid_block_residual`` are ControlNet outputs,
        ``added_cond_kwargs`` holds SDXL's ``text_embeds`` and ``time_ids``: all go to
        diffusers' forward as they are.
        """
        return self.run(sample, timestep, encoder_hidden_states,
                        down_block_additional_residuals=down_block_residuals,
                        mid_block_additional_residual=mid_block_residual,
                        added_cond_kwargs=added_cond_kwargs)

    def run(self, sample: torch.Tensor, *inputs, **unet_kwargs) -> Dict[str, torch.Tensor]:
        """Activations at ``taps`` for one pass of any diffusers UNet (``UNet2DModel`` too)
        on ``sample`` and the forward's other arguments, stopped after the last stage
        needed."""
        multiple = 2**self.num_upsamplers
        if self.dropped and any(d % multiple for d in sample.shape[-2:]):
            raise ValueError(f'With stages freed, inputs must be multiples of {multiple} (got '
                             f'{tuple(sample.shape[-2:])}): pad the input first, as the '
                             'sources do.')
        store: Dict[str, torch.Tensor] = {}
        with self._capture(store, tuple(sample.shape[-2:])), self._stop_after_last_stage():
            try:
                self.unet(sample, *inputs, return_dict=False, **unet_kwargs)
            except StopForward:
                pass
        return {tap: store[tap] for tap in self.taps}

    @contextmanager
    def _stop_after_last_stage(self):
        def stop(_module, _inputs, _output):
            raise StopForward

        handle = self.unet.get_submodule(self.stages_run[-1]).register_forward_hook(stop)
        try:
            yield
        finally:
            handle.remove()
