from .demo import GATEDemoDataset
from .label_scarce import (Bedroom28Dataset, DDPMSegDataset, Horse21Dataset,
                           IgnoreSmallRegions, LoadNpyAnnotations)

__all__ = ['GATEDemoDataset', 'DDPMSegDataset', 'Bedroom28Dataset', 'Horse21Dataset',
           'LoadNpyAnnotations', 'IgnoreSmallRegions']
