"""GATE for MMSegmentation: ``import mmseg_gate`` registers ``GATEBackbone`` in MMSeg's MODELS
registry (configs: ``custom_imports=dict(imports=['mmseg_gate'], allow_failed_imports=False)``).
"""
from . import engine  # noqa: F401  (registers the CPU DDP wrapper, safe resume)
from .models import GATEBackbone

__version__ = '0.1.0'
__all__ = ['GATEBackbone', '__version__']
