"""What a config asks to extract into a feature store: its frozen source, noise seed and
images (``tools/extract_features.py``)."""
from typing import Optional, Sequence, Tuple

from ..datasets.image_lists import ImageList, dataset_images, folder_images
from .correspondence.features import spair_images


def extraction_plan(cfg, splits: Optional[Sequence[str]] = None,
                    images: Optional[str] = None,
                    image_size: Optional[int] = None) -> Tuple[dict, int, ImageList]:
    """(source config, noise seed, images) a config names: an MMSeg config's
    ``model.backbone.source`` over its datasets' images (``splits``, default train and
    test), a correspondence config's ``source`` over its pairs' images, or either's source
    over a folder of ``images``."""
    if cfg.get('model') is not None and 'backbone' in cfg.model:
        source = cfg.model.backbone.get('source', {})
        seed = cfg.model.backbone.get('noise_seed', 0)
        if images is None:
            return source, seed, dataset_images(cfg, splits or ('train', 'test'))
    elif cfg.get('source') is not None:
        source, seed = cfg.source, cfg.get('train', {}).get('seed', 0)
        if images is None:
            return source, seed, spair_images(cfg.data, splits)  # default: every split
    else:
        raise ValueError('The config names no frozen source: it needs model.backbone.source '
                         '(an MMSeg config) or source (a correspondence config).')
    return source, seed, folder_images(images, image_size)
