"""GATE's guided variants: each a recipe of guidance (a prompt, optional ControlNets, an
optional LoRA) and of noise (timestep, guided denoising, noise seed).

A variant in a config::

    dict(prompt=None,                  # None: the extractor's prompt
         controlnets=dict(canny=1.0),  # ControlNet name -> conditioning scale
         lora='moderate', lora_scale=1.0,
         timestep=50,                  # absent: the extractor's timestep
         denoising_from=60,            # absent: the extractor's; None: no denoising
         noise_seed=1)                 # absent or None: the call's noise

Names refer to the extractor's ``controlnets`` and ``loras`` dicts. The authors' recipes need
the noise keys per variant: label-scarce denoises only its ControlNet variant from t = 60;
correspondence repeats two variants with a second noise seed.
"""
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..common.timesteps import check_timesteps

_KEYS = ('prompt', 'controlnets', 'lora', 'lora_scale', 'timestep', 'denoising_from',
         'noise_seed')


@dataclass(frozen=True)
class Variant:
    prompt: str
    controlnets: Tuple[Tuple[str, float], ...] = field(default_factory=tuple)
    lora: Optional[str] = None
    lora_scale: float = 1.0
    timestep: int = 50
    denoising_from: Optional[int] = None
    noise_seed: Optional[int] = None

    @property
    def summary(self) -> str:
        """A short name: its guidance, and its noise where it has its own."""
        parts = ['prompt']
        parts += [name if scale == 1 else f'{name}x{scale:g}' for name, scale in self.controlnets]
        if self.lora is not None:
            parts.append(f'lora {self.lora}' + ('' if self.lora_scale == 1
                                                else f'x{self.lora_scale:g}'))
        if self.denoising_from is not None:
            parts.append(f'denoised from {self.denoising_from}')
        if self.noise_seed is not None:
            parts.append(f'seed {self.noise_seed}')
        return ' + '.join(parts)

    @property
    def adapter(self) -> Optional[str]:
        """Name of the UNet adapter: one per (LoRA, scale) pair, since peft keeps one scale
        per adapter."""
        if self.lora is None:
            return None
        return f'{self.lora}@{self.lora_scale:g}'.replace('.', '_')  # no dots in module keys


def parse_variants(variants: Optional[Sequence[dict]], default_prompt: str,
                   controlnet_names: Sequence[str], lora_names: Sequence[str],
                   timestep: int = 50, denoising_from: Optional[int] = None,
                   num_steps: int = 1000) -> List[Variant]:
    """Variants from their config dicts, the extractor-wide ``timestep`` and
    ``denoising_from`` filling what a variant leaves out; None means one prompt-only
    variant."""
    if not variants:
        variants = [dict()]
    parsed = []
    for i, cfg in enumerate(variants):
        unknown = set(cfg) - set(_KEYS)
        if unknown:
            raise KeyError(f'Variant {i} has unknown keys {sorted(unknown)}; use '
                           f'{", ".join(_KEYS)}.')
        controlnets: Dict[str, float] = dict(cfg.get('controlnets') or {})
        for name in controlnets:
            if name not in controlnet_names:
                raise KeyError(f"Variant {i} uses ControlNet '{name}', which is "
                               f'not in `controlnets` ({sorted(controlnet_names)}).')
        lora = cfg.get('lora')
        if lora is not None and lora not in lora_names:
            raise KeyError(f"Variant {i} uses LoRA '{lora}', which is not in "
                           f'`loras` ({sorted(lora_names)}).')
        seed = cfg.get('noise_seed')
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ValueError(f'Variant {i}: noise_seed must be an integer or None, got {seed!r}.')
        step, start = check_timesteps(cfg.get('timestep', timestep),
                                      cfg.get('denoising_from', denoising_from), num_steps,
                                      f'Variant {i}: ' if cfg else '')
        parsed.append(Variant(prompt=cfg.get('prompt') or default_prompt,
                              controlnets=tuple(sorted(controlnets.items())), lora=lora,
                              lora_scale=float(cfg.get('lora_scale', 1.0)), timestep=step,
                              denoising_from=start, noise_seed=seed))
    return parsed
