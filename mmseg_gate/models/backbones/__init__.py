from .gate_backbone import GATEBackbone

__all__ = ['GATEBackbone']
