"""LoRA files as named adapters on the one shared UNet, and per-sample adapter choice.

Files may be diffusers/peft LoRA safetensors (what ``tools/train_lora.py`` writes) or
kohya-style ones (``lora_unet_*`` keys, conv "LoCon" layers included), which diffusers converts.
A batch can mix adapters: peft's LoRA layers take an ``adapter_names`` list (one name per
sample, ``'__base__'`` for none); :func:`adapters_per_sample` hands it to every LoRA layer.
"""
import json
import os.path as osp
import warnings
from contextlib import contextmanager
from typing import Dict, NamedTuple, Optional, Sequence

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                             convert_unet_state_dict_to_peft)
from peft import get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from ...fileio import atomic_file

BASE = '__base__'
TEXT_ENCODERS = ('text_encoder', 'text_encoder_2')
# peft's keys: LoRA factors (and their bias), DoRA magnitudes.
_PEFT_KEY_ENDINGS = ('.lora_A.weight', '.lora_B.weight', '.lora_B.bias',
                     '.lora_magnitude_vector')

class LoRAFile(NamedTuple):
    """A LoRA file's tensors in peft's key format, per model: ``unet`` (keys ``unet.*``) and
    ``text_encoders`` (``'text_encoder'``/``'text_encoder_2'`` -> keys with that prefix), with
    kohya alphas or diffusers' adapter metadata (rank, alpha, targets) where it has them."""
    unet: Dict[str, torch.Tensor]
    text_encoders: Dict[str, Dict[str, torch.Tensor]]
    alphas: Optional[dict]
    metadata: Optional[dict]


def read_lora_file(path: str, unet_config=None) -> LoRAFile:
    """Read and check a LoRA safetensors file, every key normalised to peft's format.

    diffusers/peft files, kohya files (``lora_unet_*``/``lora_te*``, LoCon convolutions
    included) and files mixing diffusers' two key styles (``lora.down/up`` and ``lora_A/B``)
    are all normalised here: diffusers converts a dict only when its first key lacks
    ``lora_A``, so a mixed file would otherwise silently lose its attention LoRA.
    ``unet_config`` lets diffusers convert kohya files that use the original (SGM) block
    names, as SDXL ones do.
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
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        parts.setdefault(key.split('.')[0], {})[key] = value
    unknown_models = set(parts) - {'unet', *TEXT_ENCODERS}
    if unknown_models:
        raise ValueError(f"LoRA file '{path}' has weights for {sorted(unknown_models)}; GATE "
                         f"loads LoRAs of the UNet and text encoders ({['unet', *TEXT_ENCODERS]}).")
    if 'unet' not in parts:
        raise ValueError(f"LoRA file '{path}' has no UNet weights (keys like 'unet.*' or "
                         "'lora_unet_*').")
    unet = convert_unet_state_dict_to_peft(parts.pop('unet'))
    text = {name: convert_state_dict_to_peft(convert_state_dict_to_diffusers(keys))
            for name, keys in parts.items()}
    for keys in (unet, *text.values()):
        _check_tensors(keys, path)
    return LoRAFile(unet, text, alphas, metadata)


def _check_tensors(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    unknown = [k for k in state_dict if not k.endswith(_PEFT_KEY_ENDINGS)]
    if unknown:
        raise ValueError(f"LoRA file '{path}' has {len(unknown)} key(s) in a format GATE does "
                         f'not know, e.g. {unknown[:3]}; expected diffusers, peft or kohya '
                         'LoRA keys (lora_A/lora_B, lora.down/lora.up, lora_down/lora_up).')
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ValueError(f"LoRA file '{path}' holds non-finite (NaN or infinite) values in "
                         f'{len(bad)} tensor(s), e.g. {bad[:3]}: it is corrupt (a diverged '
                         'training run?). Use an earlier checkpoint or train it again.')
    _check_ranks(state_dict, path)


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


def save_lora_file(unet, path: str, adapter_name: str = 'default',
                   text_encoders: Optional[Dict[str, object]] = None) -> str:
    """Write ``unet``'s adapter (and those of ``text_encoders``: ``'text_encoder'`` ->
    model) as one LoRA safetensors file in one key format (peft's
    ``<model>.<module>.lora_A/lora_B.weight``, which diffusers and GATE load as they are) with
    each adapter's rank/alpha metadata, atomically."""
    models = {'unet': unet, **(text_encoders or {})}
    state, config = {}, {}
    for prefix, model in models.items():
        for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items():
            state[f'{prefix}.{key}'] = value.detach().contiguous()
        for key, value in model.peft_config[adapter_name].to_dict().items():
            config[f'{prefix}.{key}'] = sorted(value) if isinstance(value, set) else value
    metadata = {'format': 'pt',
                LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True,
                                                      default=str)}
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


def load_lora_adapters(unet, adapters: Dict[str, str], scales: Dict[str, float]
                       ) -> Dict[str, LoRAFile]:
    """Load the UNet part of each ``name -> path`` as an adapter, check that every tensor
    reached its module, set the adapters' scales; return the files read (their text-encoder
    parts are loaded by :func:`load_text_encoder_lora`)."""
    files = {}
    for name, path in adapters.items():
        files[name] = lora = read_lora_file(path, unet.config)
        check_lora_fits(unet, lora.unet, path)
        try:
            unet.load_lora_adapter(lora.unet, network_alphas=lora.alphas, adapter_name=name,
                                   prefix='unet',
                                   metadata=None if lora.alphas else lora.metadata)
        except Exception as err:  # peft/diffusers errors do not name the file
            raise ValueError(f"LoRA '{path}' could not be loaded into the UNet "
                             f'({type(err).__name__}: {err}).') from err
        check_lora_landed(unet, name, lora.unet, 'unet', path)
    if adapters:
        names = list(adapters)
        unet.set_adapters(names, weights=[scales[n] for n in names])
    return files


def add_lora(model, config, adapter_name: str = 'default') -> None:
    """Inject LoRA layers into any module with peft's own function. Text encoders go through
    here rather than transformers' PEFT integration (``PreTrainedModel.add_adapter``), which
    checks peft versions of its own (transformers 5.24 refuses peft 0.21)."""
    from peft import inject_adapter_in_model
    with warnings.catch_warnings():  # the expected note when a model gets a second adapter
        warnings.filterwarnings('ignore', message='Already found a `peft_config` attribute')
        inject_adapter_in_model(config, model, adapter_name=adapter_name)


def text_encoder_lora_config(state_dict: Dict[str, torch.Tensor], lora: LoRAFile,
                             prefix: str):
    """The ``LoraConfig`` of the ``prefix`` part of ``lora`` (``state_dict``: its tensors
    without the prefix): from the file's adapter metadata where it has some, else from the
    tensors' ranks and the kohya alphas, as diffusers derives it."""
    from diffusers.utils import get_peft_kwargs
    from peft import LoraConfig
    kwargs = {k[len(prefix) + 1:]: v for k, v in (lora.metadata or {}).items()
              if k.startswith(f'{prefix}.')} if not lora.alphas else {}
    if not kwargs:
        ranks = {k: v.shape[1] for k, v in state_dict.items() if k.endswith('.lora_B.weight')}
        alphas = {k[len(prefix) + 1:]: v for k, v in (lora.alphas or {}).items()
                  if k.split('.')[0] == prefix}
        kwargs = get_peft_kwargs(ranks, alphas or None, state_dict, is_unet=False)
    return LoraConfig(**kwargs)


def load_text_encoder_lora(text_encoder, prefix: str, name: str, lora: LoRAFile,
                           path: str) -> None:
    """Load the ``prefix`` ('text_encoder' or 'text_encoder_2') part of ``lora`` into
    ``text_encoder`` as adapter ``name`` with peft's own functions, and check that every
    tensor landed."""
    from peft import set_peft_model_state_dict
    state_dict = {k[len(prefix) + 1:]: v for k, v in lora.text_encoders[prefix].items()}
    if not hasattr(text_encoder, 'text_model'):  # newer CLIP classes are flat
        state_dict = {k.removeprefix('text_model.'): v for k, v in state_dict.items()}
    try:
        add_lora(text_encoder, text_encoder_lora_config(state_dict, lora, prefix), name)
        set_peft_model_state_dict(text_encoder, state_dict, adapter_name=name)
    except Exception as err:  # peft errors do not name the file
        raise ValueError(f"LoRA '{path}' could not be loaded into the {prefix} "
                         f'({type(err).__name__}: {err}).') from err
    check_lora_landed(text_encoder, name, lora.text_encoders[prefix], prefix, path)


def load_text_encoder_loras(text_encoders: Sequence, files: Dict[str, LoRAFile],
                            wanted: Dict[str, tuple]) -> Dict[str, float]:
    """Load the text-encoder parts of LoRA ``files`` ({adapter: file}) as adapters;
    ``wanted`` is {adapter: (path, scale)}. Returns {adapter: scale} of those with one."""
    adapters = {}
    for adapter, lora in files.items():
        for prefix, encoder in zip(TEXT_ENCODERS, text_encoders):
            if prefix in lora.text_encoders:
                load_text_encoder_lora(encoder, prefix, adapter, lora, wanted[adapter][0])
                adapters[adapter] = wanted[adapter][1]
    return adapters


def activate_adapter(models: Sequence, adapter: Optional[str],
                     scales: Dict[str, float]) -> None:
    """Run every model that holds LoRA ``adapter`` with it alone, at its scale; the others
    (and all of them for ``adapter=None``) with their LoRA layers off."""
    from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters
    for model in models:
        if not getattr(model, 'peft_config', None):
            continue
        if adapter is not None and adapter in model.peft_config:
            set_weights_and_activate_adapters(model, [adapter], [scales[adapter]])
            set_adapter_layers(model, enabled=True)
        else:
            set_adapter_layers(model, enabled=False)


def enable_adapters(models: Sequence, scales: Dict[str, float]) -> None:
    """Every LoRA layer on, each adapter of ``scales`` at its scale: for batches whose samples
    choose their adapter (:func:`adapters_per_sample`; a sample of ``BASE`` gets none)."""
    from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters
    for model in models:
        if getattr(model, 'peft_config', None):
            set_weights_and_activate_adapters(model, list(scales), list(scales.values()))
            set_adapter_layers(model, enabled=True)


def check_lora_landed(model, adapter_name: str, state_dict: Dict[str, torch.Tensor],
                      prefix: str, path: str) -> None:
    """Count the file's tensors that now sit, unchanged, in the adapter's layers."""
    def bare(key: str) -> str:  # text encoders' keys may or may not carry 'text_model.'
        return key[len(prefix) + 1:].removeprefix('text_model.')

    landed = {bare(f'{prefix}.{k}'): v
              for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    missing = [key for key, value in state_dict.items()
               # compared in the layer's dtype: a float32 file in a bfloat16 model lands rounded
               if bare(key) not in landed or not torch.equal(
                   landed[bare(key)], value.to(landed[bare(key)].dtype))]
    if missing:
        raise ValueError(
            f"LoRA '{path}': only {len(state_dict) - len(missing)} of its {len(state_dict)} "
            f'{prefix} tensors reached a layer; not loaded: {missing[:5]}'
            f'{" ..." if len(missing) > 5 else ""}. The file does not match this model or '
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
