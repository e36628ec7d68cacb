"""GATE for MMSegmentation: ``import mmseg_gate`` registers ``GATEBackbone`` in MMSeg's MODELS
registry, ``GATERunner`` (safe, exact, atomic checkpoints) and the datasets (configs:
``custom_imports=dict(imports=['mmseg_gate'], allow_failed_imports=False)``). The frozen
half is a feature source (``mmseg_gate.sources``): ``StableDiffusionSource`` (GATE's guided
Stable Diffusion features, formerly ``GATEFeatureExtractor``, which still names it) or several
sources side by side (``CompositeSource``), usable without MMSeg; ``StoredSource`` serves
features extracted once into a store (``mmseg_gate.store``, ``tools/extract_features.py``).
"""
from . import datasets, engine, evaluation  # noqa: F401  (registrations, safe loading)
from .models import GATEBackbone
from .sources import (ADMSource, CompositeSource, FeatureSource, GATEFeatureExtractor,
                      StableDiffusionSource, build_source)
from .store import StoredSource

__version__ = '0.2.0'
__all__ = ['GATEBackbone', 'FeatureSource', 'StableDiffusionSource', 'ADMSource',
           'CompositeSource', 'GATEFeatureExtractor', 'StoredSource', 'build_source',
           '__version__']
