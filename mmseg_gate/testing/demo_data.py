"""A small, learnable segmentation dataset in ADE20K's folder layout, for the demo and tests.

Scenes are Voronoi partitions whose cells belong to five ADE20K classes (wall, building, sky,
floor, tree); each class has its own colour and texture, so a head on frozen features can learn
them, and the real ``ADE20KDataset`` pipeline (``reduce_zero_label``) reads them unchanged.
"""
import os
import os.path as osp

import numpy as np
from PIL import Image

# ADE20K ids (1-based in the annotation files; 0 is "other" and ignored) and their colours.
DEMO_CLASSES = {1: (120, 120, 120), 2: (180, 120, 90), 3: (90, 160, 235), 4: (200, 190, 140),
                5: (40, 140, 40)}
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
