"""LoRA files as named adapters on the one shared UNet, and per-sample adapter choice.

Files may be diffusers/peft LoRA safetensors (what ``tools/train_lora.py`` writes) or
kohya-style ones (``lora_unet_*`` keys, conv "LoCon" layers included), which diffusers converts.
A batch can mix adapters: peft's LoRA layers take an ``adapter_names`` list (one name per
sample, ``'__base__'`` for none); :func:`adapters_per_sample` hands it to every LoRA layer.
"""
import json
import logging
import os.path as osp
from contextlib import contextmanager
from typing import Dict, Optional, Sequence, Tuple

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils import convert_unet_state_dict_to_peft
from mmengine.logging import print_log
from peft import get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from ...fileio import atomic_file

BASE = '__base__'
# peft's keys: LoRA factors (and their bias), DoRA magnitudes.
_PEFT_KEY_ENDINGS = ('.lora_A.weight', '.lora_B.weight', '.lora_B.bias',
                     '.lora_magnitude_vector')

def read_lora_file(path: str, unet_config=None
                   ) -> Tuple[Dict[str, torch.Tensor], Optional[dict], Optional[dict]]:
    """The UNet part of a LoRA safetensors file, every key in peft's format
    (``unet.<module>.lora_A/lora_B.weight``), with kohya alphas or diffusers' adapter metadata
    (rank, alpha, targets) where the file has them.

    diffusers/peft files, kohya files (``lora_unet_*``, LoCon convolutions included) and files
    mixing diffusers' two key styles (``lora.down/up`` and ``lora_A/B``) are all normalised
    here: diffusers converts a dict only when its first key lacks ``lora_A``, so a mixed file
    would otherwise silently lose its attention LoRA. ``unet_config`` lets diffusers convert
    kohya files that use the original (SGM) block names, as SDXL ones do.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(_missing_lora_hint(path))
    if not path.endswith('.safetensors'):
        raise ValueError(f"LoRA file '{path}' is not .safetensors; GATE loads safetensors "
                         'only (pickle files run code when loaded).')
    try:
        state_dict, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
            osp.dirname(osp.abspath(path)), weight_name=osp.basename(path),
            use_safetensors=True, local_files_only=True, return_lora_metadata=True,
            unet_config=unet_config)
    except Exception as err:  # SafetensorError, OSError, ValueError: add the file and fix
        raise ValueError(
            f"LoRA file '{path}' cannot be read ({type(err).__name__}: "
            f'{str(err).strip().splitlines()[0] if str(err).strip() else ""}). It is empty, '
            'truncated or not a LoRA safetensors file: train it again with '
            'tools/train_lora.py or download it again.') from err
    unet_keys = {k: v for k, v in state_dict.items() if k.startswith('unet.')}
    if len(unet_keys) < len(state_dict):
        print_log(f"LoRA '{path}' also has text-encoder weights; they are not used (prompts "
                  'are encoded by the base text encoder).', logger='current',
                  level=logging.WARNING)
    if not unet_keys:
        raise ValueError(f"LoRA file '{path}' has no UNet weights (keys like 'unet.*' or "
                         "'lora_unet_*').")
    unet_keys = convert_unet_state_dict_to_peft(unet_keys)
    unknown = [k for k in unet_keys if not k.endswith(_PEFT_KEY_ENDINGS)]
    if unknown:
        raise ValueError(f"LoRA file '{path}' has {len(unknown)} key(s) in a format GATE does "
                         f'not know, e.g. {unknown[:3]}; expected diffusers, peft or kohya '
                         'LoRA keys (lora_A/lora_B, lora.down/lora.up, lora_down/lora_up).')
    bad = [k for k, v in unet_keys.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ValueError(f"LoRA file '{path}' holds non-finite (NaN or infinite) values in "
                         f'{len(bad)} tensor(s), e.g. {bad[:3]}: it is corrupt (a diverged '
                         'training run?). Use an earlier checkpoint or train it again.')
    _check_ranks(unet_keys, path)
    return unet_keys, alphas, metadata


def _check_ranks(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Each module's down (A) and up (B) factors must agree on the rank."""
    problems = []
    for key, down in state_dict.items():
        if not key.endswith('.lora_A.weight'):
            continue
        up = state_dict.get(key.replace('.lora_A.', '.lora_B.'))
        module = key[:-len('.lora_A.weight')]
        if up is None:
            problems.append(f'{module}: lora_A without lora_B')
        elif down.shape[0] != up.shape[1]:
            problems.append(f'{module}: rank {down.shape[0]} (A) but {up.shape[1]} (B)')
    problems += [f"{k[:-len('.lora_B.weight')]}: lora_B without lora_A" for k in state_dict
                 if k.endswith('.lora_B.weight')
                 and k.replace('.lora_B.', '.lora_A.') not in state_dict]
    if problems:
        raise ValueError(f"LoRA file '{path}' is inconsistent ({len(problems)} problem(s), "
                         f'e.g. {problems[:3]}): it is corrupt or was edited. Train it again '
                         'with tools/train_lora.py.')


def save_lora_file(unet, path: str, adapter_name: str = 'default') -> str:
    """Write ``unet``'s adapter as a LoRA safetensors file in one key format (peft's
    ``unet.<module>.lora_A/lora_B.weight``, which diffusers and GATE load as they are) with
    its rank/alpha metadata, atomically."""
    state = {f'unet.{k}': v.detach().contiguous()
             for k, v in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()}
    config = {f'unet.{k}': sorted(v) if isinstance(v, set) else v
              for k, v in unet.peft_config[adapter_name].to_dict().items()}
    metadata = {'format': 'pt',
                LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    with atomic_file(path) as tmp:
        save_file(state, tmp, metadata=metadata)
    return path


def check_lora_fits(unet, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Every LoRA target must be a UNet module of matching size (else: LoRA of another model)."""
    modules = dict(unet.named_modules())
    problems = []
    for key, value in state_dict.items():
        if not key.endswith(('.lora_A.weight', '.lora_B.weight')):
            continue
        target = key[len('unet.'):-len('.lora_A.weight')]
        module = modules.get(target)
        if module is None:
            problems.append(f'{target}: no such module')
            continue
        module = getattr(module, 'base_layer', module)
        down = key.endswith('.lora_A.weight')
        size = value.shape[1] if down else value.shape[0]
        expected = module.weight.shape[1] if down else module.weight.shape[0]
        if size != expected:
            problems.append(f'{target}: LoRA size {size}, module size {expected}')
    if problems:
        raise ValueError(
            f"LoRA '{path}' does not fit this UNet ({len(problems)} problems, e.g. "
            f'{problems[:3]}). It was trained for another model; train one for this UNet with '
            'tools/train_lora.py.')


def load_lora_adapters(unet, adapters: Dict[str, str], scales: Dict[str, float]) -> None:
    """Load each ``name -> path`` as an adapter, check that every tensor of the file reached
    its module, and set the adapters' scales."""
    for name, path in adapters.items():
        state_dict, alphas, metadata = read_lora_file(path, unet.config)
        check_lora_fits(unet, state_dict, path)
        try:
            unet.load_lora_adapter(state_dict, network_alphas=alphas, adapter_name=name,
                                   prefix='unet', metadata=None if alphas else metadata)
        except Exception as err:  # peft/diffusers errors do not name the file
            raise ValueError(f"LoRA '{path}' could not be loaded into the UNet "
                             f'({type(err).__name__}: {err}).') from err
        check_lora_landed(unet, name, state_dict, path)
    if adapters:
        names = list(adapters)
        unet.set_adapters(names, weights=[scales[n] for n in names])


def check_lora_landed(unet, adapter_name: str, state_dict: Dict[str, torch.Tensor],
                      path: str) -> None:
    """Count the file's tensors that now sit, unchanged, in the adapter's layers."""
    landed = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    missing = [key for key, value in state_dict.items()
               if key[len('unet.'):] not in landed
               or not torch.equal(landed[key[len('unet.'):]].to(value), value)]
    if missing:
        raise ValueError(
            f"LoRA '{path}': only {len(state_dict) - len(missing)} of its {len(state_dict)} "
            f'tensors reached a UNet layer; not loaded: {missing[:5]}'
            f'{" ..." if len(missing) > 5 else ""}. The file does not match this UNet or '
            'uses a key format GATE does not know.')


@contextmanager
def adapters_per_sample(unet, names: Sequence[str]):
    """Within the block, sample i of every UNet batch uses adapter ``names[i]``."""
    names = list(names)

    def add_names(_module, args, kwargs):
        return args, dict(kwargs, adapter_names=names)

    handles = [m.register_forward_pre_hook(add_names, with_kwargs=True)
               for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _missing_lora_hint(path: str) -> str:
    return (f"LoRA file '{path}' does not exist. Train one for your dataset with "
            '`python tools/train_lora.py configs/lora/<dataset>.py` (it saves '
            'lora_step<N>.safetensors every K steps: use a moderate and a slightly overfit '
            'one), or use a config without LoRA variants (configs/gate_upernet_ade20k_prompt.py, '
            'configs/gate_upernet_cityscapes_prompt.py).')
