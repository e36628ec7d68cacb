"""A small, learnable segmentation dataset in ADE20K's folder layout, for the demo and tests.

Scenes are Voronoi partitions whose cells belong to five ADE20K classes (wall, building, sky,
floor, tree); each class has its own colour and texture, so a head on frozen features can learn
them, and the real ``ADE20KDataset`` pipeline (``reduce_zero_label``) reads them unchanged.
"""
import json
import os
import os.path as osp
from typing import Dict

import numpy as np
from PIL import Image

from ..datasets.demo import DEMO_CLASSES

IMAGE_SIZE = (96, 128)  # height, width: non-square on purpose


def synthetic_scene(rng: np.random.Generator, size=IMAGE_SIZE):
    """One image and its annotation (ids 1-5): Voronoi cells of random classes, textured
    colours; ``size`` is (height, width)."""
    height, width = size
    seeds = rng.uniform((0, 0), (height, width), size=(rng.integers(3, 7), 2))
    classes = rng.choice(list(DEMO_CLASSES), size=len(seeds))
    yy, xx = np.mgrid[:height, :width]
    dist = (yy[..., None] - seeds[:, 0])**2 + (xx[..., None] - seeds[:, 1])**2
    label = classes[dist.argmin(-1)].astype(np.uint8)
    colours = np.array([DEMO_CLASSES[c] for c in sorted(DEMO_CLASSES)], dtype=np.float32)
    image = colours[label - 1]
    stripes = 20 * np.sin((xx + 2 * yy * (label % 2)) * (0.3 + 0.2 * label))[..., None]
    image = image + stripes + rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_ade_layout_dataset(root: str, num_train: int, num_val: int, seed: int = 0) -> None:
    """Write ``images/{training,validation}/*.jpg`` and ``annotations/.../*.png`` under root."""
    rng = np.random.default_rng(seed)
    for split, count in (('training', num_train), ('validation', num_val)):
        os.makedirs(osp.join(root, 'images', split))
        os.makedirs(osp.join(root, 'annotations', split))
        for i in range(count):
            image, label = synthetic_scene(rng)
            name = f'ADE_{split[:5]}_{i:08d}'
            Image.fromarray(image).save(osp.join(root, 'images', split, name + '.jpg'),
                                        quality=95)
            Image.fromarray(label).save(osp.join(root, 'annotations', split, name + '.png'))




def write_ddpm_seg_layout_dataset(root: str, num_train: int, num_test: int, size: int = 64,
                                  seed: int = 0) -> None:
    """Write DDPM-segmentation's layout under root: ``real/{train,test}/<i>.png`` square
    images with ``<i>.npy`` label arrays (classes 0-4, all scored, as in Horse-21)."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', num_train), ('test', num_test)):
        folder = osp.join(root, 'real', split)
        os.makedirs(folder)
        for i in range(count):
            image, label = synthetic_scene(rng, (size, size))
            Image.fromarray(image).save(osp.join(folder, f'{i}.png'))
            np.save(osp.join(folder, f'{i}.npy'), (label - 1).astype(np.uint8))


def write_spair_layout_dataset(root: str, pairs_per_split: Dict[str, int], size: int = 64,
                               num_keypoints: int = 8, seed: int = 0) -> None:
    """Write SPair-71k's layout under root with synthetic pairs of known correspondence: the
    target is the source scene shifted, scaled and possibly mirrored, its keypoints (random
    points of the source) moved with it. Two categories, 'cat' and 'dog'."""
    rng = np.random.default_rng(seed)
    for split, count in pairs_per_split.items():
        os.makedirs(osp.join(root, 'PairAnnotation', split))
        names = []
        for i in range(count):
            category = ('cat', 'dog')[i % 2]
            folder = osp.join(root, 'JPEGImages', category)
            os.makedirs(folder, exist_ok=True)
            big, _ = synthetic_scene(rng, (2 * size, 2 * size))
            scale = rng.uniform(0.8, 1.2)
            crop = int(round(size * scale))
            top, left = rng.integers(0, 2 * size - max(size, crop) + 1, size=2)
            dy, dx = rng.integers(-size // 8, size // 8 + 1, size=2)
            top2 = int(np.clip(top + dy, 0, 2 * size - crop))
            left2 = int(np.clip(left + dx, 0, 2 * size - crop))
            source = big[top:top + size, left:left + size]
            target = np.asarray(Image.fromarray(big[top2:top2 + crop, left2:left2 + crop])
                                .resize((size, size), Image.BILINEAR))
            mirror = bool(rng.integers(0, 2))
            if mirror:
                target = target[:, ::-1]
            src_kps, trg_kps = [], []
            while len(src_kps) < num_keypoints:
                x, y = rng.uniform(2, size - 3, size=2)
                tx, ty = (x + left - left2) / scale, (y + top - top2) / scale
                if 1 <= tx <= size - 2 and 1 <= ty <= size - 2:
                    src_kps.append([round(x, 2), round(y, 2)])
                    trg_kps.append([round(size - 1 - tx if mirror else tx, 2), round(ty, 2)])
            src, trg = f'{split}{i:04d}s', f'{split}{i:04d}t'
            Image.fromarray(source).save(osp.join(folder, src + '.jpg'), quality=95)
            Image.fromarray(np.ascontiguousarray(target)).save(osp.join(folder, trg + '.jpg'),
                                                               quality=95)
            name = f'{i:06d}-{src}-{trg}:{category}'
            names.append(name)
            xs, ys = [p[0] for p in trg_kps], [p[1] for p in trg_kps]
            annotation = dict(
                pair_id=i, src_imname=src + '.jpg', trg_imname=trg + '.jpg', category=category,
                src_imsize=[size, size, 3], trg_imsize=[size, size, 3], src_kps=src_kps,
                trg_kps=trg_kps, kps_ids=[str(k) for k in range(num_keypoints)],
                src_bndbox=[0, 0, size - 1, size - 1],
                trg_bndbox=[int(min(xs)), int(min(ys)), int(max(xs)) + 1, int(max(ys)) + 1],
                mirror=int(mirror))
            with open(osp.join(root, 'PairAnnotation', split, name + '.json'), 'w') as f:
                json.dump(annotation, f)
        os.makedirs(osp.join(root, 'Layout', 'large'), exist_ok=True)
        with open(osp.join(root, 'Layout', 'large', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(names) + '\n')


def write_dhf_split_files(root: str, splits: Dict[str, str] = None,
                          per_file: Dict[str, int] = None) -> Dict[str, str]:
    """Diffusion Hyperfeatures' split files (``spair_71k_train.json``,
    ``spair_71k_val-360.json``, ``spair_71k_test-360.json``) of the SPair-layout pairs under
    ``root``, written into ``root/JPEGImages`` as the GATE authors keep them: the pairs of
    SPair split ``splits[name]`` (default trn, val, test), the first ``per_file[name]`` of
    them if given. Returns the files written."""
    splits = splits or dict(train='trn', val='val', test='test')
    names = dict(train='spair_71k_train.json', val='spair_71k_val-360.json',
                 test='spair_71k_test-360.json')
    written = {}
    for name, split in splits.items():
        layout = osp.join(root, 'Layout', 'large', f'{split}.txt')
        with open(layout) as f:
            pair_names = [line.strip() for line in f if line.strip()]
        pair_names = pair_names[:(per_file or {}).get(name)]
        entries = []
        for pair_name in pair_names:
            with open(osp.join(root, 'PairAnnotation', split, pair_name + '.json')) as f:
                pair = json.load(f)
            entries.append(dict(
                source_path=f"{pair['category']}/{pair['src_imname']}",
                target_path=f"{pair['category']}/{pair['trg_imname']}",
                source_points=pair['src_kps'], target_points=pair['trg_kps'],
                category=pair['category'], source_bounding_box=pair['src_bndbox'],
                target_bounding_box=pair['trg_bndbox']))
        written[name] = osp.join(root, 'JPEGImages', names[name])
        with open(written[name], 'w') as f:
            json.dump(entries, f)
    return written
