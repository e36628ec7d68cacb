from .backbones import GATEBackbone
from .heads import PixelClassifierHead
from .segmentors import GATEEncoderDecoder

__all__ = ['GATEBackbone', 'GATEEncoderDecoder', 'PixelClassifierHead']
