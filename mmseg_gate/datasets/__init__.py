from .demo import GATEDemoDataset

__all__ = ['GATEDemoDataset']
