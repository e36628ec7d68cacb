"""Random weights for every model a source config names, in the real formats: what
``tools/benchmark.py`` and ``tools/extract_features.py`` run with ``--random-init``."""
import os.path as osp
from typing import Optional, Sequence

from ..sources.adm import ADM_LSUN_256
from .architectures import (DINOV2_BASE, TINY_ADM, TINY_DINOV2, save_random_adm,
                            save_random_controlnet, save_random_dinov2, save_random_lora,
                            save_random_stable_diffusion)
from .dit_architectures import (DIT_ARCHITECTURES, save_random_dit, save_random_dit_controlnet,
                                save_random_dit_lora)


def write_random_models(source_cfg, folder: str, arch: str, lora_rank: int = 4,
                        lora_targets: Optional[Sequence[str]] = None) -> None:
    """Random weights of ``arch`` for a source config's models (SD model, ControlNets and
    LoRAs; an ADM: the real LSUN layout, or :data:`TINY_ADM` for the tiny archs; a DiT:
    'sd35' or 'flux', :func:`save_random_dit`, with its ControlNets
    (:func:`save_random_dit_controlnet`) and LoRAs (:func:`save_random_dit_lora`, on the DiT
    LoRA recipe's targets: ``lora_targets`` are a UNet recipe's); each source of a
    composite), written under ``folder``; the config is pointed at them."""
    kind = source_cfg.get('type', 'StableDiffusionSource')
    if kind == 'CompositeSource':
        for name, source in source_cfg.sources.items():
            write_random_models(source, osp.join(folder, name), arch, lora_rank, lora_targets)
        return
    if kind == 'DINOv2Source':
        source_cfg.model = save_random_dinov2(
            osp.join(folder, 'dinov2'), TINY_DINOV2 if arch.startswith('tiny') else DINOV2_BASE)
        return
    if kind == 'DiTSource':
        if arch not in DIT_ARCHITECTURES:
            raise ValueError(f'--arch {arch}: a DiTSource config takes one of '
                             f'{sorted(DIT_ARCHITECTURES)}.')
        source_cfg.model = save_random_dit(osp.join(folder, arch), arch)
        for name, controlnet in (source_cfg.get('controlnets') or {}).items():
            controlnet.model = save_random_dit_controlnet(
                osp.join(folder, f'controlnet-{name}'), source_cfg.model)
        for i, name in enumerate(source_cfg.get('loras') or {}):  # the DiT recipe's targets
            source_cfg.loras[name] = save_random_dit_lora(
                osp.join(folder, f'lora-{name}.safetensors'), source_cfg.model, lora_rank,
                seed=i)
        return
    if kind == 'ADMSource':
        architecture = TINY_ADM if arch.startswith('tiny') else ADM_LSUN_256
        source_cfg.architecture = dict(architecture)
        source_cfg.model = save_random_adm(osp.join(folder, 'adm.pt'), architecture)
        return
    source_cfg.model = save_random_stable_diffusion(osp.join(folder, arch), arch)
    for name, controlnet in (source_cfg.get('controlnets') or {}).items():
        controlnet.model = save_random_controlnet(osp.join(folder, f'controlnet-{name}'),
                                                  source_cfg.model)
    for i, name in enumerate(source_cfg.get('loras') or {}):
        source_cfg.loras[name] = save_random_lora(
            osp.join(folder, f'lora-{name}.safetensors'), source_cfg.model, lora_rank,
            seed=i, targets=lora_targets)
