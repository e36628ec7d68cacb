from .demo import GATEDemoDataset
from .images import (IMAGE_SUFFIXES, LoadAnyImage, image_size, list_images, read_image,
                     read_square, to_model_range)
from .label_scarce import (Bedroom28Dataset, DDPMSegDataset, Horse21Dataset,
                           IgnoreSmallRegions, LoadNpyAnnotations)

__all__ = ['GATEDemoDataset', 'DDPMSegDataset', 'Bedroom28Dataset', 'Horse21Dataset',
           'LoadNpyAnnotations', 'IgnoreSmallRegions', 'IMAGE_SUFFIXES', 'LoadAnyImage',
           'image_size', 'list_images', 'read_image', 'read_square', 'to_model_range']
