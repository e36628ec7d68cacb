"""LoRA files as named adapters on the one shared UNet, and per-sample adapter choice.

Files may be diffusers/peft LoRA safetensors (what ``tools/train_lora.py`` writes) or
kohya-style ones (``lora_unet_*`` keys, conv "LoCon" layers included), which diffusers converts.
A batch can mix adapters: peft's LoRA layers take an ``adapter_names`` list (one name per
sample, ``'__base__'`` for none); :func:`adapters_per_sample` hands it to every LoRA layer.
"""
import logging
import os
import os.path as osp
import re
import tempfile
from contextlib import contextmanager
from typing import Dict, Optional, Sequence, Tuple

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers
from mmengine.logging import print_log
from peft import get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

BASE = '__base__'
_LORA_SUFFIX = re.compile(r'\.(lora_[AB]|lora\.(down|up)|lora_linear_layer\.(down|up)|'
                          r'lora_(down|up))\.weight$|\.alpha$|\.lora_magnitude_vector.*$')


def read_lora_file(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[dict], Optional[dict]]:
    """The UNet part of a LoRA safetensors file in diffusers' key format, with kohya alphas
    or diffusers' adapter metadata (rank, alpha, targets) where the file has them."""
    if not osp.isfile(path):
        raise FileNotFoundError(_missing_lora_hint(path))
    if not path.endswith('.safetensors'):
        raise ValueError(f"GATEBackbone: LoRA file '{path}' is not .safetensors; GATE loads "
                         'safetensors only (pickle files run code when loaded).')
    state_dict, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        osp.dirname(osp.abspath(path)), weight_name=osp.basename(path), use_safetensors=True,
        local_files_only=True, return_lora_metadata=True)
    unet_keys = {k: v for k, v in state_dict.items() if k.startswith('unet.')}
    if len(unet_keys) < len(state_dict):
        print_log(f"GATEBackbone: LoRA '{path}' also has text-encoder weights; they are not "
                  'used (prompts are encoded by the base text encoder).', logger='current',
                  level=logging.WARNING)
    if not unet_keys:
        raise ValueError(f"GATEBackbone: LoRA file '{path}' has no UNet weights (keys like "
                         "'unet.*' or 'lora_unet_*').")
    return unet_keys, alphas, metadata


def save_lora_file(unet, path: str, adapter_name: str = 'default') -> str:
    """Write ``unet``'s adapter as a diffusers LoRA safetensors file with its rank/alpha
    metadata, atomically (temporary file in the same folder, then rename)."""
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    state = convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet, adapter_name=adapter_name))
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp, unet_lora_layers=state, weight_name='lora.safetensors',
            safe_serialization=True,
            unet_lora_adapter_metadata=unet.peft_config[adapter_name].to_dict())
        os.replace(osp.join(tmp, 'lora.safetensors'), path)
    return path


def check_lora_fits(unet, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Every LoRA target must be a UNet module of matching size (else: LoRA of another model)."""
    modules = dict(unet.named_modules())
    problems = []
    for key, value in state_dict.items():
        if not key.endswith('.weight') or '.lora' not in key:
            continue
        target = _LORA_SUFFIX.sub('', key[len('unet.'):])
        module = modules.get(target)
        if module is None:
            problems.append(f'{target}: no such module')
            continue
        module = getattr(module, 'base_layer', module)
        suffix = key[len('unet.') + len(target):]
        down = 'lora_A' in suffix or 'down' in suffix
        size = value.shape[1] if down else value.shape[0]
        expected = module.weight.shape[1] if down else module.weight.shape[0]
        if size != expected:
            problems.append(f'{target}: LoRA size {size}, module size {expected}')
    if problems:
        raise ValueError(
            f"GATEBackbone: LoRA '{path}' does not fit this UNet ({len(problems)} problems, "
            f'e.g. {problems[:3]}). It was trained for another model; train one for this '
            'UNet with tools/train_lora.py.')


def load_lora_adapters(unet, adapters: Dict[str, str], scales: Dict[str, float]) -> None:
    """Load each ``name -> path`` as an adapter and set its scale."""
    for name, path in adapters.items():
        state_dict, alphas, metadata = read_lora_file(path)
        check_lora_fits(unet, state_dict, path)
        unet.load_lora_adapter(state_dict, network_alphas=alphas, adapter_name=name,
                               prefix='unet', metadata=None if alphas else metadata)
    if adapters:
        names = list(adapters)
        unet.set_adapters(names, weights=[scales[n] for n in names])


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
    return (f"GATEBackbone: LoRA file '{path}' does not exist. Train one for your dataset with "
            '`python tools/train_lora.py configs/lora/<dataset>.py` (it saves '
            'lora_step<N>.safetensors every K steps: use a moderate and a slightly overfit '
            'one), or use a config without LoRA variants (configs/gate_upernet_ade20k_prompt.py, '
            'configs/gate_upernet_cityscapes_prompt.py).')
