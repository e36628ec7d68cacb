"""The embedded demo's dataset: ADE20K's folder layout with its own five classes."""
from mmseg.datasets import ADE20KDataset
from mmseg.registry import DATASETS

from ..testing.demo_data import DEMO_CLASSES

DEMO_CLASS_NAMES = ('wall', 'building', 'sky', 'floor', 'tree')


@DATASETS.register_module()
class GATEDemoDataset(ADE20KDataset):
    """ADE20K's layout and label ids 1-5 (0 ignored), evaluated over the five demo classes
    only, so metrics tables are not padded with 145 absent ADE20K classes."""
    METAINFO = dict(classes=DEMO_CLASS_NAMES,
                    palette=[list(DEMO_CLASSES[i]) for i in sorted(DEMO_CLASSES)])
