"""The store's manifest: what was extracted, from which weights, with which noise, and where.

``manifest.json`` is plain JSON (nothing in a store runs code). Its ``header`` says what a
store *is* -- the source config with its weights paths replaced by the files' fingerprints
(``files``), the noise seed, the stored dtype and the image keys in order -- and is compared
field by field with the header a config asks for: a store from other weights, LoRAs, taps,
timestep, seeds, noise or images is refused, naming the fields. ``complete`` becomes true once every
image's shard exists; ``records`` then lists per image its pixels' hash, shape, shard, the
shard's size (a truncated shard is named) and what extracting it cost.
"""
import inspect
import json
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

from ..fileio import atomic_file
from ..sources.base import SOURCES
from .fingerprint import config_fingerprints

FORMAT, VERSION = 'mmseg_gate.feature_store', 1
MANIFEST = 'manifest.json'
# How an image's noise is drawn (stores of earlier versions drew one noise field for all).
NOISE = 'per image: sha256(noise_seed, pixels)'


class StoreError(ValueError):
    """A store that cannot serve the request: the message names the store, the problem and
    the fix."""


def to_plain(value):
    """A config (ConfigDict, tuples) as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def with_recorded_defaults(source: Dict) -> Dict:
    """``source`` (a plain config) with the defaults its class records
    (``recorded_defaults``: options whose default once changed what the features are, such as
    the DiT sources' treatment of massive activations), in nested sources too: a store of
    other features is then refused by name, not read as these."""
    source = dict(source)
    cls = SOURCES.get(source.get('type', 'StableDiffusionSource')) \
        if isinstance(source.get('type', ''), str) else None
    if cls is not None:
        params = inspect.signature(cls.__init__).parameters
        for key in getattr(cls, 'recorded_defaults', ()):
            source.setdefault(key, to_plain(params[key].default))
    if isinstance(source.get('sources'), dict):  # a CompositeSource's
        source['sources'] = {name: with_recorded_defaults(part) if isinstance(part, dict)
                             else part for name, part in source['sources'].items()}
    return source


def _replace_paths(value, files: Dict, prefix: str = 'source'):
    if prefix in files:
        return f'<weights: files[{prefix!r}]>'
    if isinstance(value, dict):
        return {k: _replace_paths(v, files, f'{prefix}.{k}') for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_paths(v, files, f'{prefix}.{i}') for i, v in enumerate(value)]
    return value


def make_header(source_cfg, noise_seed: int, dtype: str,
                image_keys: Optional[Sequence[str]] = None) -> Tuple[Dict, Dict]:
    """What a store extracted with ``source_cfg`` is (``image_keys=None``: any images), and
    the weights paths the header replaced by fingerprints (kept beside it, not compared)."""
    source = to_plain(dict(source_cfg))
    source.setdefault('type', 'StableDiffusionSource')
    source = with_recorded_defaults(source)
    files = config_fingerprints(source)
    header = dict(source=_replace_paths(source, files), files=files,
                  noise_seed=int(noise_seed), noise=NOISE, dtype=str(dtype))
    if image_keys is not None:
        header['images'] = list(image_keys)
    return header, {prefix: _value_at(source, prefix) for prefix in files}


def _value_at(cfg, prefix: str):
    for part in prefix.split('.')[1:]:
        cfg = cfg[int(part)] if isinstance(cfg, list) else cfg[part]
    return cfg


def _short(value, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + '...'


def differences(stored, wanted, field: str = '') -> List[str]:
    """Where two headers differ, one line per differing field (nested fields by path)."""
    if stored == wanted:
        return []
    if field == 'images' and isinstance(stored, list) and isinstance(wanted, list):
        return _image_differences(stored, wanted)
    if isinstance(stored, dict) and isinstance(wanted, dict):
        found = []
        for key in sorted(set(stored) | set(wanted), key=str):
            name = f'{field}.{key}' if field else str(key)
            if key not in stored:
                found.append(f'{name}: not in the store, asked for {_short(wanted[key])}')
            elif key not in wanted:
                found.append(f'{name}: the store has {_short(stored[key])}, not asked for')
            else:
                found += differences(stored[key], wanted[key], name)
        return found
    return [f'{field}: the store has {_short(stored)}, asked for {_short(wanted)}']


def _image_differences(stored: List[str], wanted: List[str]) -> List[str]:
    missing = [k for k in wanted if k not in set(stored)]
    extra = [k for k in stored if k not in set(wanted)]
    if not missing and not extra:
        return ['images: the same images in another order']
    lines = []
    if missing:
        lines.append(f'images: {len(missing)} asked for are not in the store (first: '
                     f'{missing[0]!r})')
    if extra:
        lines.append(f'images: {len(extra)} in the store are not asked for (first: '
                     f'{extra[0]!r})')
    return lines


def check_header(folder: str, stored: Dict, wanted: Dict, ignore: Sequence[str] = ()) -> None:
    """Refuse a store whose header differs from ``wanted``, naming every differing field."""
    stored = {k: v for k, v in stored.items() if k not in ignore}
    wanted = {k: v for k, v in wanted.items() if k not in ignore}
    found = differences(stored, wanted)
    if found:
        raise StoreError(
            f"The feature store '{folder}' was extracted with other settings:\n  "
            + '\n  '.join(found) + '\nExtract a new store (another --out / --features '
            'folder), or remove this one to extract it again.')


def check_store_folder(folder: str) -> None:
    """A store is a folder (new or existing), never a file."""
    if osp.exists(folder) and not osp.isdir(folder):
        raise StoreError(f"The feature store '{folder}' is a file, not a folder: give "
                         '--features / --out a folder (a new one, or a store extracted '
                         'before).')


def read_manifest(folder: str) -> Optional[Dict]:
    """The manifest of the store in ``folder``, None if there is none yet."""
    check_store_folder(folder)
    path = osp.join(folder, MANIFEST)
    if not osp.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise StoreError(f"'{path}' is not a feature store manifest ({err}); remove the folder "
                         'to extract the store again.') from err
    if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
        raise StoreError(f"'{path}' is not a manifest of tools/extract_features.py; use an "
                         'empty folder for a store.')
    if manifest.get('version') != VERSION:
        raise StoreError(f"'{path}' is a version {manifest.get('version')} store; this "
                         f'mmseg_gate reads version {VERSION}: extract it again.')
    return manifest


def write_manifest(folder: str, manifest: Dict) -> None:
    manifest = dict(manifest, format=FORMAT, version=VERSION)
    with atomic_file(osp.join(folder, MANIFEST)) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write('\n')


def shard_name(index: int) -> str:
    """Where image ``index`` of the header's list is stored, relative to the store."""
    return osp.join('shards', f'{index:06d}.safetensors')
