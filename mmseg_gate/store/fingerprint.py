"""Fingerprints of the files a frozen source loads: what makes two stores comparable.

A store is only valid for the weights it was extracted with. Every string of a source config
that names a local file or folder (or a model id found in the Hugging Face cache) is replaced
by the size and SHA-256 of each file a loader reads there, so that a moved folder still
matches and a retrained LoRA under the same name does not.
"""
import hashlib
import os
import os.path as osp
import re
from typing import Dict, Optional

from ..sources.stable_diffusion.loading import is_variant_weights

# What diffusers' and transformers' loaders read from a model folder (variant weights such as
# ``*.fp16.safetensors`` are never loaded by the sources).
_READ_SUFFIXES = ('.safetensors', '.json', '.txt', '.model')
_HUB_ID = re.compile(r'^[\w.-]+/[\w.-]+$')
_CHUNK = 1 << 24


def file_fingerprint(path: str) -> Dict:
    """``{'bytes': size, 'sha256': hex}`` of one file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(_CHUNK), b''):
            digest.update(block)
    return dict(bytes=osp.getsize(path), sha256=digest.hexdigest())


def folder_fingerprint(folder: str) -> Dict[str, Dict]:
    """Fingerprints of the files a loader reads under ``folder``, by relative path."""
    found = {}
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for name in sorted(files):
            if name.endswith(_READ_SUFFIXES) and not is_variant_weights(name):
                path = osp.join(root, name)
                found[osp.relpath(path, folder)] = file_fingerprint(path)
    return found


def _hub_snapshot(model_id: str) -> Optional[str]:
    """The cached snapshot folder of a Hugging Face model id, None if it is not cached."""
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # noqa: BLE001  (not a cached model: compared by its id alone)
        return None


def path_fingerprint(value: str) -> Optional[Dict]:
    """The fingerprint of a config string that names weights, None for other strings."""
    if osp.isfile(value):
        return dict(file=file_fingerprint(value))
    if osp.isdir(value):
        return dict(folder=folder_fingerprint(value))
    if _HUB_ID.match(value) and not value.startswith(('.', '/')):
        snapshot = _hub_snapshot(value)
        if snapshot is not None:
            return dict(folder=folder_fingerprint(snapshot))
    return None


def config_fingerprints(cfg, prefix: str = 'source') -> Dict[str, Dict]:
    """``{'source.loras.a': fingerprint, ...}`` for every weights path in a config."""
    found = {}
    if isinstance(cfg, dict):
        for key in sorted(cfg):
            found.update(config_fingerprints(cfg[key], f'{prefix}.{key}'))
    elif isinstance(cfg, (list, tuple)):
        for i, item in enumerate(cfg):
            found.update(config_fingerprints(item, f'{prefix}.{i}'))
    elif isinstance(cfg, str):
        fingerprint = path_fingerprint(cfg)
        if fingerprint is not None:
            found[prefix] = fingerprint
    return found
