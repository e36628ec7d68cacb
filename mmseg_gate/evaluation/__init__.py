"""Metrics as MMEngine metrics (registered in MMSeg's METRICS on import)."""
from .benchmark_iou import BenchmarkIoUMetric
from .pck import PCKMetric

__all__ = ['BenchmarkIoUMetric', 'PCKMetric']
