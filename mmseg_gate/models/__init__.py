from .backbones import GATEBackbone
from .diffusion import GATEFeatureExtractor
from .segmentors import GATEEncoderDecoder

__all__ = ['GATEBackbone', 'GATEFeatureExtractor', 'GATEEncoderDecoder']
