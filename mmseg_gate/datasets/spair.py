"""SPair-71k (Min et al., 2019) in its real layout, for semantic correspondence.

    SPair-71k/JPEGImages/<category>/<name>.jpg
    SPair-71k/PairAnnotation/{trn,val,test}/<id>-<src>-<trg>:<category>.json
    SPair-71k/Layout/large/{trn,val,test}.txt     (the pair names of each split)

A pair annotation holds ``src_imname``/``trg_imname``, ``category``, ``src_kps``/``trg_kps``
(index-matched [x, y] lists in original pixels), ``src_bndbox``/``trg_bndbox`` ([x1, y1, x2,
y2]) and ``src_imsize``/``trg_imsize`` ([W, H, C]). Splits: trn 53,340, val 5,384, test 12,234
pairs over 18 categories.

Diffusion Hyperfeatures' split files, which the GATE authors train and select on, list pairs
in one JSON each (``spair_71k_train.json``, ``spair_71k_val-360.json``: 20 validation pairs
per category, ``spair_71k_test-360.json``): a list of ``source_path``/``target_path``
(``<category>/<name>.jpg`` under ``JPEGImages``), ``source_points``/``target_points``
([x, y] pixels), ``category`` and ``source_bounding_box``/``target_bounding_box``; image sizes
are read from the images. :func:`load_dhf_pairs` reads them into the same pair dicts.
"""
import json
import os.path as osp

from PIL import Image
from typing import Dict, List, Optional, Sequence

SPAIR_CATEGORIES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
                    'chair', 'cow', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
                    'sheep', 'train', 'tvmonitor')
SPLITS = ('trn', 'val', 'test')
_GET_SPAIR = ('Download SPair-71k: `wget http://cvlab.postech.ac.kr/research/SPair-71k/data/'
              'SPair-71k.tar.gz && tar xzf SPair-71k.tar.gz` and point the config\'s '
              "`data_root` at the unpacked 'SPair-71k' folder.")
_FIELDS = ('src_imname', 'trg_imname', 'category', 'src_kps', 'trg_kps', 'src_bndbox',
           'trg_bndbox', 'src_imsize', 'trg_imsize')
DHF_FILES = dict(train='spair_71k_train.json', val='spair_71k_val-360.json',
                 test='spair_71k_test-360.json')
_DHF_FIELDS = ('source_path', 'target_path', 'source_points', 'target_points', 'category',
               'source_bounding_box', 'target_bounding_box')
_GET_DHF = ('The split files come with Diffusion Hyperfeatures (https://github.com/'
            'diffusion-hyperfeatures/diffusion_hyperfeatures, annotations/) and the GATE '
            "authors' correspondence_gate/dataset/; the authors put them in "
            'SPair-71k/JPEGImages.')


def pair_names(root: str, split: str) -> List[str]:
    """The split's pair names, from ``Layout/large/<split>.txt``."""
    if split not in SPLITS:
        raise ValueError(f"SPair-71k split must be one of {SPLITS}, got {split!r}.")
    layout = osp.join(root, 'Layout', 'large', f'{split}.txt')
    if not osp.isfile(layout):
        raise FileNotFoundError(f"'{layout}' does not exist: '{root}' is not SPair-71k or is "
                                f'incomplete. {_GET_SPAIR}')
    with open(layout) as f:
        return [line.strip() for line in f if line.strip()]


def read_annotation(path: str) -> Dict:
    """One pair annotation, checked: JSON with every field, matched keypoints that lie in
    their images."""
    try:
        with open(path, encoding='utf-8') as f:
            pair = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Pair annotation '{path}' is not valid JSON ({err}); re-download "
                         f'the dataset. {_GET_SPAIR}') from err
    missing = [key for key in _FIELDS if key not in pair] if isinstance(pair, dict) \
        else list(_FIELDS)
    if missing:
        raise ValueError(f"Pair annotation '{path}' lacks {missing}; re-download the dataset.")
    check_keypoints(pair, f"Pair annotation '{path}'")
    return pair


def check_keypoints(pair: Dict, where: str) -> None:
    """Matched keypoint lists of equal length, every point [x, y] inside its image."""
    if len(pair['src_kps']) != len(pair['trg_kps']) or not pair['src_kps']:
        raise ValueError(f'{where} has {len(pair["src_kps"])} source and '
                         f'{len(pair["trg_kps"])} target keypoints: they must be matched, '
                         'one for one.')
    for side in ('src', 'trg'):
        width, height = pair[f'{side}_imsize'][:2]
        outside = [kp for kp in pair[f'{side}_kps']
                   if len(kp) != 2 or not (0 <= kp[0] <= width and 0 <= kp[1] <= height)]
        if outside:
            raise ValueError(f'{where}: {side} keypoint(s) {outside[:3]} lie outside the '
                             f'{width}x{height} image (keypoints are [x, y] pixels); fix or '
                             're-download the annotation.')


def load_pairs(root: str, split: str, categories: Optional[Sequence[str]] = None,
               per_category: Optional[int] = None) -> List[Dict]:
    """The split's pairs (optionally some categories, the first ``per_category`` of each),
    each with absolute image paths; every listed annotation and image must exist."""
    pairs, counts = [], {}
    for name in pair_names(root, split):
        category = name.split(':')[-1]
        if categories and category not in categories:
            continue
        if per_category is not None and counts.get(category, 0) >= per_category:
            continue
        path = osp.join(root, 'PairAnnotation', split, f'{name}.json')
        if not osp.isfile(path):
            raise FileNotFoundError(f"Pair annotation '{path}' listed in Layout/large/"
                                    f'{split}.txt does not exist. {_GET_SPAIR}')
        pair = read_annotation(path)
        for side in ('src', 'trg'):
            image = osp.join(root, 'JPEGImages', pair['category'], pair[f'{side}_imname'])
            if not osp.isfile(image):
                raise FileNotFoundError(f"Image '{image}' of pair '{name}' does not exist. "
                                        f'{_GET_SPAIR}')
            pair[f'{side}_path'] = image
        pair['name'] = name
        counts[category] = counts.get(category, 0) + 1
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"No pairs in split '{split}' of '{root}' for categories "
                         f'{list(categories or [])}.')
    return pairs


def load_dhf_pairs(path: str, image_root: str,
                   categories: Optional[Sequence[str]] = None) -> List[Dict]:
    """The pairs of one of Diffusion Hyperfeatures' split files (module docstring), images
    under ``image_root`` (SPair's ``JPEGImages``), as :func:`load_pairs` returns them. A file
    that is not such a list, a pair lacking a field, unmatched keypoints, a keypoint outside
    its image and a missing image are errors naming the file and the pair."""
    if not osp.isfile(path):
        raise FileNotFoundError(f"Split file '{path}' does not exist. {_GET_DHF}")
    try:
        with open(path, encoding='utf-8') as f:
            entries = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Split file '{path}' is not valid JSON ({err}). {_GET_DHF}") from err
    if not isinstance(entries, list):
        raise ValueError(f"Split file '{path}' holds a {type(entries).__name__}, not the list "
                         f'of pairs of Diffusion Hyperfeatures\' split files. {_GET_DHF}')
    pairs = []
    for index, entry in enumerate(entries):
        where = f"Pair {index} of '{path}'"
        missing = [k for k in _DHF_FIELDS if k not in entry] if isinstance(entry, dict) \
            else list(_DHF_FIELDS)
        if missing:
            raise ValueError(f'{where} lacks {missing}. {_GET_DHF}')
        if categories and entry['category'] not in categories:
            continue
        pair = dict(category=entry['category'], src_kps=entry['source_points'],
                    trg_kps=entry['target_points'], src_bndbox=entry['source_bounding_box'],
                    trg_bndbox=entry['target_bounding_box'])
        for side, key in (('src', 'source_path'), ('trg', 'target_path')):
            image = osp.join(image_root, entry[key])
            if not osp.isfile(image):
                raise FileNotFoundError(f"{where}: image '{image}' does not exist. "
                                        f'{_GET_SPAIR}')
            with Image.open(image) as opened:  # the header only
                width, height = opened.size
            pair[f'{side}_imname'] = osp.basename(entry[key])
            pair[f'{side}_imsize'] = [width, height, 3]
            pair[f'{side}_path'] = image
        check_keypoints(pair, where)
        pair['name'] = f'{osp.basename(path)}:{index}:{entry["category"]}'
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"No pairs in '{path}' for categories {list(categories or [])}.")
    return pairs
