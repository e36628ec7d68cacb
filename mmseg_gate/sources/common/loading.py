"""Loading frozen weights through their libraries' ``from_pretrained``, completely or not at
all: every part of a pipeline folder checked before anything loads, every tensor of a file
landed in the model and finite, safetensors only, and errors that name the file.
"""
import os.path as osp
import re
from typing import Dict, Optional, Sequence

import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging

_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')


def is_local_path(pretrained: str) -> bool:
    """A hub id is ``owner/name``; anything else (or anything on disk) is a path."""
    return osp.exists(pretrained) or not _HUB_ID.match(pretrained)


# What a pipeline part's loader needs in its folder: alternatives, each a set of files that
# must all be there. transformers 5 builds a default tokenizer, silently, from a folder
# without its vocabulary: every prompt would become unknown tokens.
PART_FILES = dict(model=(('config.json', ), ), scheduler=(('scheduler_config.json', ), ),
                  clip_tokenizer=(('vocab.json', 'merges.txt'), ('tokenizer.json', )),
                  t5_tokenizer=(('spiece.model', ), ('tokenizer.json', )))


def check_parts(folder: str, parts: Dict[str, str], pipeline: str, hint: str) -> None:
    """Refuse a diffusers pipeline folder that lacks one of ``parts`` (subfolder -> kind of
    :data:`PART_FILES`) or a file its loader needs, naming the folder and the part."""
    for name, kind in parts.items():
        sub = osp.join(folder, name)
        if not osp.isdir(sub):
            raise FileNotFoundError(
                f"'{folder}' has no '{name}/' folder. A diffusers-format {pipeline} folder "
                f"holds {', '.join(n + '/' for n in parts)}.\n{hint}")
        options = PART_FILES[kind]
        if not any(all(osp.isfile(osp.join(sub, f)) for f in files) for files in options):
            wanted = ' or '.join(' + '.join(files) for files in options)
            raise FileNotFoundError(
                f"'{sub}' lacks {wanted}: its {kind.replace('_', ' ')} cannot be loaded (an "
                f'incomplete download?). Download that folder again.\n{hint}')


def load_weights(model_class, pretrained: str, subfolder: Optional[str] = None,
                 hint: str = '', unused_blocks: Sequence[str] = (), **kwargs):
    """``model_class.from_pretrained`` (safetensors only) that fails, naming the weights and
    ending with ``hint``, unless every tensor of the file landed in the model and all of them
    are finite. ``unused_blocks``: modules deliberately not built (``kwargs`` override the
    config to leave them out, e.g. a transformer's blocks after the last tap), whose tensors
    alone may stay in the file."""
    where = f'{pretrained}/{subfolder}' if subfolder else pretrained
    verbosity = diffusers_logging.get_verbosity()
    if unused_blocks:  # diffusers would list every tensor left out, which is intended here
        diffusers_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(
            pretrained, subfolder=subfolder, use_safetensors=True, output_loading_info=True,
            **kwargs)
    except Exception as err:  # SafetensorError, OSError, size mismatches: add the file
        raise load_error(pretrained, where, err, hint) from err
    finally:
        diffusers_logging.set_verbosity(verbosity)
    prefixes = tuple(f'{block}.' for block in unused_blocks)
    problems = {kind: [key for key in info.get(kind) or []
                       if kind != 'unexpected_keys' or not key.startswith(prefixes)]
                for kind in ('missing_keys', 'unexpected_keys', 'mismatched_keys')}
    if any(problems.values()):
        summary = '; '.join(f'{len(keys)} {kind.replace("_", " ")} (e.g. {keys[:3]})'
                            for kind, keys in problems.items() if keys)
        raise ValueError(
            f"'{where}' does not load completely into {model_class.__name__}: {summary}. The "
            'weights belong to another architecture or the file is incomplete; re-download '
            f'it.\n{hint}')
    check_finite(model, where)
    return model


def check_finite(model: torch.nn.Module, where: str) -> None:
    """NaN or infinite weights would train silently into `loss: nan`: refuse them."""
    bad = [name for name, tensor in (*model.named_parameters(), *model.named_buffers())
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"'{where}' holds non-finite (NaN or infinite) weights in "
                         f'{len(bad)} tensor(s), e.g. {bad[:3]}. The file is corrupt: '
                         'download or export it again.')


def load_error(pretrained: str, where: str, err: Exception, hint: str) -> Exception:
    """Our error for a failed load of ``where``: a hub id that could not be resolved, or a
    damaged file; ending with ``hint`` (how to get the weights)."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not is_local_path(pretrained) and isinstance(err, OSError):
        return OSError(
            f"'{pretrained}' is not a local folder, and could not be loaded as a Hugging Face "
            f'hub id from the hub or its local cache ({message}). Download it first (online), '
            f'or give a local folder.\n{hint}')
    return ValueError(f"Cannot load '{where}' ({type(err).__name__}: {message}). The file is "
                      'truncated, empty or not what its config describes: download it '
                      f'again.\n{hint}')


def drop_vae_decoder(vae: AutoencoderKL) -> None:
    """Features never need pixels back: free the decoder (2.5 TFLOPs, 50M params)."""
    vae.decoder = None
    vae.post_quant_conv = None
