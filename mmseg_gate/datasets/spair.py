"""SPair-71k (Min et al., 2019) in its real layout, for semantic correspondence.

    SPair-71k/JPEGImages/<category>/<name>.jpg
    SPair-71k/PairAnnotation/{trn,val,test}/<id>-<src>-<trg>:<category>.json
    SPair-71k/Layout/large/{trn,val,test}.txt     (the pair names of each split)

A pair annotation holds ``src_imname``/``trg_imname``, ``category``, ``src_kps``/``trg_kps``
(index-matched [x, y] lists in original pixels), ``src_bndbox``/``trg_bndbox`` ([x1, y1, x2,
y2]) and ``src_imsize``/``trg_imsize`` ([W, H, C]). Splits: trn 53,340, val 5,384, test 12,234
pairs over 18 categories.
"""
import json
import os.path as osp
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
    if missing or len(pair['src_kps']) != len(pair['trg_kps']) or not pair['src_kps']:
        raise ValueError(f"Pair annotation '{path}' lacks {missing or 'matched keypoints'}; "
                         're-download the dataset.')
    for side in ('src', 'trg'):
        width, height = pair[f'{side}_imsize'][:2]
        outside = [kp for kp in pair[f'{side}_kps']
                   if len(kp) != 2 or not (0 <= kp[0] <= width and 0 <= kp[1] <= height)]
        if outside:
            raise ValueError(f"Pair annotation '{path}': {side} keypoint(s) {outside[:3]} lie "
                             f'outside the {width}x{height} image (keypoints are [x, y] '
                             'pixels); fix or re-download the annotation.')
    return pair


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
