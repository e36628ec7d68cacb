from .backbones import GATEBackbone
from .diffusion import GATEFeatureExtractor
from .heads import PixelClassifierHead
from .segmentors import GATEEncoderDecoder

__all__ = ['GATEBackbone', 'GATEFeatureExtractor', 'GATEEncoderDecoder', 'PixelClassifierHead']
