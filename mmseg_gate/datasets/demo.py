"""The embedded demo's dataset: ADE20K's folder layout with its own five classes."""
from mmseg.datasets import ADE20KDataset
from mmseg.registry import DATASETS

# ADE20K ids (1-based in the annotation files; 0 is "other" and ignored) and their colours.
DEMO_CLASSES = {1: (120, 120, 120), 2: (180, 120, 90), 3: (90, 160, 235), 4: (200, 190, 140),
                5: (40, 140, 40)}
DEMO_CLASS_NAMES = ('wall', 'building', 'sky', 'floor', 'tree')


@DATASETS.register_module()
class GATEDemoDataset(ADE20KDataset):
    """ADE20K's layout and label ids 1-5 (0 ignored), evaluated over the five demo classes
    only, so metrics tables are not padded with 145 absent ADE20K classes."""
    METAINFO = dict(classes=DEMO_CLASS_NAMES,
                    palette=[list(DEMO_CLASSES[i]) for i in sorted(DEMO_CLASSES)])
