"""DDPM-segmentation's label-scarce benchmark (Bedroom-28, Horse-21) in MMSeg.

The benchmark (Baranchuk et al., ``yandex-research/ddpm-segmentation``) ships, per dataset,
``<root>/real/train`` and ``<root>/real/test`` folders of square images (``*.png``) with one
label array per image beside it (same name, ``.npy``, 256x256 class indices). Its class lists:

- Bedroom-28: index 0 is "background" and is ignored (not trained, not scored), which leaves
  the 28 classes 1-28 (read here with ``reduce_zero_label``: 0 -> 255, k -> k - 1);
- Horse-21: 21 classes with the background (0) trained and scored; 255 is ignored.

Label arrays are read with ``allow_pickle=False`` (nothing in a file runs); every image must
have its label, and a folder without images is an error that says how to get the data.
"""
import os.path as osp
from typing import List

import numpy as np

from mmseg.datasets import BaseSegDataset
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.registry import DATASETS, TRANSFORMS

from .images import image_size

BEDROOM28_CLASSES = (
    'bed', 'bed***footboard', 'bed***headboard', 'bed***side rail', 'carpet', 'ceiling',
    'chandelier / ceiling fan blade', 'curtain', 'cushion', 'floor',
    'table/nightstand/dresser', 'table/nightstand/dresser***top', 'picture / mirrow', 'pillow',
    'lamp***column', 'lamp***shade', 'wall', 'window', 'curtain rod', 'window***frame',
    'chair', 'picture / mirror***frame', 'plinth', 'door / door frame', 'pouf', 'wardrobe',
    'plant', 'table staff')
HORSE21_CLASSES = (
    'background', 'person', 'back', 'barrel', 'bridle', 'chest', 'ear', 'eye', 'forelock',
    'head', 'hoof', 'leg', 'mane', 'muzzle', 'neck', 'nostril', 'tail', 'thigh', 'saddle',
    'shoulder', 'leg protection')
_GET_DATA = ('Get the benchmark with `bash datasets/download_datasets.sh` from '
             'https://github.com/yandex-research/ddpm-segmentation (it unpacks '
             'datasets/{bedroom_28,horse_21}/real/{train,test}) and point `data_root` at '
             'datasets/<name>.')


def _palette(num: int) -> List[List[int]]:
    rng = np.random.default_rng(num)
    return rng.integers(0, 256, size=(num, 3)).tolist()


@DATASETS.register_module()
class DDPMSegDataset(BaseSegDataset):
    """A dataset of DDPM-segmentation's layout: images with ``.npy`` label arrays beside them.

    Give ``data_prefix=dict(img_path='real/train', seg_map_path='real/train')`` for a folder,
    or an ``ann_file`` listing image paths relative to ``data_prefix`` without suffix (what
    ``tools/label_scarce.py`` writes for its random splits). Classes come from ``metainfo``
    (the subclasses below fix the benchmark's).
    """
    METAINFO = dict(classes=None, palette=[])

    def __init__(self, img_suffix: str = '.png', seg_map_suffix: str = '.npy', **kwargs):
        if self.METAINFO['classes'] is None and not (kwargs.get('metainfo') or {}).get(
                'classes'):
            raise ValueError(f'{type(self).__name__} needs its class names: give '
                             "`metainfo=dict(classes=(...))`, one per label index.")
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, **kwargs)

    @classmethod
    def get_label_map(cls, new_classes=None):
        """Without built-in classes, the given ones name the label indices in order."""
        return None if cls.METAINFO['classes'] is None else super().get_label_map(new_classes)

    def load_data_list(self) -> List[dict]:
        folder = self.data_prefix.get('img_path', '')
        if not self.ann_file and not osp.isdir(folder):
            raise FileNotFoundError(f"Label-scarce data folder '{folder}' does not exist. "
                                    f'{_GET_DATA}')
        data_list = super().load_data_list()
        if not data_list:
            raise FileNotFoundError(f"No '*{self.img_suffix}' images in '{folder}'. "
                                    f'{_GET_DATA}')
        missing = [d['seg_map_path'] for d in data_list
                   if 'seg_map_path' in d and not osp.isfile(d['seg_map_path'])]
        missing += [d['img_path'] for d in data_list if not osp.isfile(d['img_path'])]
        if missing:
            raise FileNotFoundError(
                f'{len(missing)} of the {len(data_list)} images of {folder or self.ann_file} '
                f'lack a file, e.g. {missing[:3]}: the dataset is incomplete. {_GET_DATA}')
        for data in data_list:
            if 'seg_map_path' in data:
                self.check_label(data['seg_map_path'], data['img_path'])
        return data_list

    def check_label(self, label_path: str, image_path: str) -> None:
        """Before any training: the label's class ids exist and its size is its image's."""
        num = len(self.METAINFO['classes'] or self.metainfo['classes'])
        end = num + 1 if self.reduce_zero_label else num  # 0 is the background then
        label = read_label_array(label_path)
        wrong = np.unique(label[(label >= end) & (label != 255)])
        if wrong.size:
            raise ValueError(
                f"Label file '{label_path}' holds class id(s) {wrong[:5].tolist()}, but "
                f'{type(self).__name__} has {num} classes (ids 0-{end - 1}'
                f"{', 0 the ignored background' if self.reduce_zero_label else ''}; 255 is "
                'ignored). The label belongs to another dataset, or give the classes with '
                '`metainfo=dict(classes=(...))`.')
        width, height = image_size(image_path)
        if label.shape != (height, width):
            raise ValueError(
                f"Label file '{label_path}' is {label.shape[0]}x{label.shape[1]} (HxW) but its "
                f"image '{image_path}' is {height}x{width}: each label must have its image's "
                'size. The files do not belong together; re-download the dataset.')


@DATASETS.register_module()
class Bedroom28Dataset(DDPMSegDataset):
    """Bedroom-28: 28 classes; background (0 in the files) ignored."""
    METAINFO = dict(classes=BEDROOM28_CLASSES, palette=_palette(28))

    def __init__(self, reduce_zero_label: bool = True, **kwargs):
        super().__init__(reduce_zero_label=reduce_zero_label, **kwargs)


@DATASETS.register_module()
class Horse21Dataset(DDPMSegDataset):
    """Horse-21: 21 classes, background included."""
    METAINFO = dict(classes=HORSE21_CLASSES, palette=_palette(21))


def read_label_array(path: str) -> np.ndarray:
    """A (H, W) array of class indices from a ``.npy`` file, never unpickling anything."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"Label file '{path}' is not a plain numpy array ({err}). The "
                         'benchmark stores integer class maps; re-download the dataset.') from err
    array = np.squeeze(array)
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer)
                               or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"Label file '{path}' holds a {array.dtype} array of shape "
                         f'{array.shape}; a (H, W) map of class indices is expected.')
    if array.size and (array.min() < 0 or array.max() > 255
                       or not np.array_equal(array, np.round(array))):
        raise ValueError(f"Label file '{path}' holds values outside the class indices 0-255.")
    return array.astype(np.uint8)


@TRANSFORMS.register_module()
class LoadNpyAnnotations(LoadAnnotations):
    """``LoadAnnotations`` for label arrays stored as ``.npy`` (same ``reduce_zero_label``
    and ``label_map`` handling)."""

    def _load_seg_map(self, results: dict) -> None:
        label = read_label_array(results['seg_map_path'])
        if self.reduce_zero_label is None:
            self.reduce_zero_label = results['reduce_zero_label']
        if self.reduce_zero_label:  # 0 -> ignored, k -> k - 1, 255 stays ignored
            label = np.where((label == 0) | (label == 255), 255, label - 1).astype(np.uint8)
        if results.get('label_map'):
            lookup = np.arange(256, dtype=np.uint8)
            for old, new in results['label_map'].items():
                lookup[old] = new
            label = lookup[label]
        results['gt_seg_map'] = label
        results['seg_fields'].append('gt_seg_map')


@TRANSFORMS.register_module()
class IgnoreSmallRegions:
    """The benchmark's training rule: a class covering fewer than ``min_pixels`` pixels of
    an image's label is ignored there (set to ``ignore_index``). Test labels keep them.

    Args:
        min_pixels (int): Default: 20 (DDPM-segmentation and the GATE authors).
        ignore_index (int): Default: 255.
    """

    def __init__(self, min_pixels: int = 20, ignore_index: int = 255):
        self.min_pixels, self.ignore_index = min_pixels, ignore_index

    def __call__(self, results: dict) -> dict:
        label = results['gt_seg_map']
        values, counts = np.unique(label, return_counts=True)
        small = values[(counts < self.min_pixels) & (values != self.ignore_index)]
        if len(small):
            label = label.copy()
            label[np.isin(label, small)] = self.ignore_index
            results['gt_seg_map'] = label
        return results

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(min_pixels={self.min_pixels})'
