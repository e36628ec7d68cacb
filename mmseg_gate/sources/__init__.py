"""The frozen half: feature sources behind one small contract (``base.py``)."""
from .adm import ADMSource
from .base import SOURCES, FeatureSource, build_source
from .composite import CompositeSource
from .dinov2 import DINOv2Source
from .dit import DiTSource, FluxSource, SD3Source
from .stable_diffusion import GATEFeatureExtractor, StableDiffusionSource

__all__ = ['SOURCES', 'FeatureSource', 'build_source', 'ADMSource', 'CompositeSource',
           'DINOv2Source', 'DiTSource', 'SD3Source', 'FluxSource',
           'StableDiffusionSource', 'GATEFeatureExtractor']
