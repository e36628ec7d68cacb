"""GATE for MMSegmentation: ``import mmseg_gate`` registers ``GATEBackbone`` in MMSeg's MODELS
registry, ``GATERunner`` (safe, exact, atomic checkpoints) and the demo dataset (configs:
``custom_imports=dict(imports=['mmseg_gate'], allow_failed_imports=False)``).
``GATEFeatureExtractor`` is the frozen half on its own: guided diffusion features for any task.
"""
from . import datasets, engine  # noqa: F401  (registrations, safe checkpoint loading)
from .models import GATEBackbone, GATEFeatureExtractor

__version__ = '0.2.0'
__all__ = ['GATEBackbone', 'GATEFeatureExtractor', '__version__']
