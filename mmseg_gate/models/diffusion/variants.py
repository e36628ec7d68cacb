"""GATE's guided variants: each is a prompt plus optional ControlNets and an optional LoRA.

A variant in a config::

    dict(prompt=None,                  # None: the backbone's prompt
         controlnets=dict(canny=1.0),  # ControlNet name -> conditioning scale
         lora='moderate', lora_scale=1.0)

Names refer to the backbone's ``controlnets`` and ``loras`` dicts.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Variant:
    prompt: str
    controlnets: Tuple[Tuple[str, float], ...] = field(default_factory=tuple)
    lora: Optional[str] = None
    lora_scale: float = 1.0

    @property
    def adapter(self) -> Optional[str]:
        """Name of the UNet adapter: one per (LoRA, scale) pair, since peft keeps one scale
        per adapter."""
        if self.lora is None:
            return None
        return f'{self.lora}@{self.lora_scale:g}'.replace('.', '_')  # no dots in module keys


def parse_variants(variants: Optional[Sequence[dict]], default_prompt: str,
                   controlnet_names: Sequence[str], lora_names: Sequence[str]) -> List[Variant]:
    """Variants from their config dicts; None means one prompt-only variant."""
    if not variants:
        return [Variant(default_prompt)]
    parsed = []
    for i, cfg in enumerate(variants):
        unknown = set(cfg) - {'prompt', 'controlnets', 'lora', 'lora_scale'}
        if unknown:
            raise KeyError(f'Variant {i} has unknown keys {sorted(unknown)}; '
                           'use prompt, controlnets, lora, lora_scale.')
        controlnets: Dict[str, float] = dict(cfg.get('controlnets') or {})
        for name in controlnets:
            if name not in controlnet_names:
                raise KeyError(f"Variant {i} uses ControlNet '{name}', which is "
                               f'not in `controlnets` ({sorted(controlnet_names)}).')
        lora = cfg.get('lora')
        if lora is not None and lora not in lora_names:
            raise KeyError(f"Variant {i} uses LoRA '{lora}', which is not in "
                           f'`loras` ({sorted(lora_names)}).')
        parsed.append(Variant(prompt=cfg.get('prompt') or default_prompt,
                              controlnets=tuple(sorted(controlnets.items())), lora=lora,
                              lora_scale=float(cfg.get('lora_scale', 1.0))))
    return parsed
