from .backbones import GATEBackbone
from .correspondence import (CorrespondenceAggregator, GATEAggregationNetwork, build_aggregator,
                             load_aggregator, save_aggregator)
from .heads import PixelClassifierHead
from .segmentors import GATEEncoderDecoder

__all__ = ['GATEBackbone', 'GATEEncoderDecoder', 'PixelClassifierHead',
           'CorrespondenceAggregator', 'GATEAggregationNetwork', 'build_aggregator',
           'load_aggregator', 'save_aggregator']
