from .backbones import GATEBackbone

__all__ = ['GATEBackbone']
