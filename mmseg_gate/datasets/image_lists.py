"""Lists of images as the model sees them, each with a key: what a store is extracted from.

A stored feature is found again by the exact pixels it was computed from (:func:`pixel_key`),
so whatever serves it -- an MMSeg data pipeline, the correspondence protocol, a folder of
images -- must produce those pixels again: the same resizing, no random augmentation.
"""
import os.path as osp
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .images import list_images, normalized_to_model_range, read_image, read_square, to_model_range


class ImageList:
    """Images to extract: ``keys`` (unique, e.g. paths relative to the data root), the files
    they come from (for messages) and ``load(i)`` -> (3, H, W) in [-1, 1] as the model sees
    image ``i``."""

    def __init__(self, keys: Sequence[str], paths: Sequence[str],
                 load: Callable[[int], torch.Tensor]):
        if len(set(keys)) != len(keys):
            raise ValueError('ImageList: the image keys are not unique.')
        self.keys, self.paths, self._load = list(keys), list(paths), load

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, index: int) -> torch.Tensor:
        return self._load(index)

    def limited(self, count: Optional[int]) -> 'ImageList':
        """The first ``count`` images (all when None)."""
        if count is None:
            return self
        return ImageList(self.keys[:count], self.paths[:count], self._load)


def folder_images(folder: str, image_size: Optional[int] = None) -> ImageList:
    """Every image under ``folder`` (recursively), at its own size or resized to
    ``image_size`` squared; keys are paths relative to ``folder``."""
    names = list_images(folder)
    paths = [osp.join(folder, n) for n in names]

    def load(i: int) -> torch.Tensor:
        if image_size:
            return read_square(paths[i], image_size, crop=False)[0]
        return to_model_range(read_image(paths[i]))
    return ImageList(names, paths, load)


# Transforms that change an image from one epoch to the next: a store cannot follow them.
_RANDOM_TRANSFORMS = ('Random', 'PhotoMetricDistortion')


def _check_fixed_pipeline(pipeline, where: str) -> None:
    random = [t['type'] for t in pipeline
              if any(word in str(t.get('type', '')) for word in _RANDOM_TRANSFORMS)]
    if random:
        raise ValueError(
            f'{where} has random transforms {random}: its images change every epoch, so stored '
            'features cannot serve it. Extract a split with a fixed pipeline (e.g. the test '
            'split), or drop the augmentation.')


class DatasetImages:
    """An MMSeg config's ``<split>_dataloader`` dataset, each sample through its own pipeline,
    the model's data preprocessor and the backbone's ``input_mean``/``input_std``: the pixels
    the backbone's source gets in training and testing, with the sample's labels."""

    def __init__(self, cfg, split: str):
        from mmengine.registry import init_default_scope
        from mmseg.registry import DATASETS, MODELS
        init_default_scope(cfg.get('default_scope', 'mmseg'))
        loader = cfg.get(f'{split}_dataloader')
        if not loader:
            raise ValueError(f"The config has no {split}_dataloader to extract; it has "
                             f"{[k[:-11] for k in cfg if k.endswith('_dataloader') and cfg[k]]}.")
        _check_fixed_pipeline(loader.dataset.get('pipeline', []), f'{split}_dataloader')
        backbone = cfg.model.backbone
        self.mean = torch.tensor(backbone.get('input_mean', (127.5, ) * 3)).view(1, 3, 1, 1)
        self.std = torch.tensor(backbone.get('input_std', (127.5, ) * 3)).view(1, 3, 1, 1)
        self.preprocessor = MODELS.build(cfg.model.data_preprocessor)
        self.dataset = DATASETS.build(loader.dataset)
        root = self.dataset.data_root or ''
        self.paths = [self.dataset.get_data_info(i)['img_path']
                      for i in range(len(self.dataset))]
        self.keys = [osp.relpath(p, root) if root else p for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, index: int) -> Tuple[torch.Tensor, object]:
        """(3, H, W) in [-1, 1] as the model sees it, and the packed data sample."""
        try:
            sample = self.dataset[index]
        except (OSError, ValueError) as err:
            raise ValueError(f"Cannot read '{self.paths[index]}': {err}") from err
        batch = self.preprocessor(dict(inputs=[sample['inputs']],
                                       data_samples=[sample['data_samples']]), training=False)
        return (normalized_to_model_range(batch['inputs'], self.mean, self.std)[0],
                batch['data_samples'][0])


def dataset_images(cfg, splits: Sequence[str] = ('train', 'test')) -> ImageList:
    """The images of an MMSeg config's ``<split>_dataloader`` datasets (:class:`DatasetImages`),
    each once, keyed by its path relative to the data root."""
    entries: List[Tuple[str, str, DatasetImages, int]] = []
    seen = set()
    for split in splits:
        images = DatasetImages(cfg, split)
        for i, (key, path) in enumerate(zip(images.keys, images.paths)):
            if key not in seen:
                seen.add(key)
                entries.append((key, path, images, i))
    return ImageList([e[0] for e in entries], [e[1] for e in entries],
                     lambda i: entries[i][2].sample(entries[i][3])[0])
