from .backbones import GATEBackbone
from .diffusion import GATEFeatureExtractor

__all__ = ['GATEBackbone', 'GATEFeatureExtractor']
