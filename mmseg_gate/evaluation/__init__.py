"""Metrics as MMEngine metrics (registered in MMSeg's METRICS on import)."""
from .benchmark_iou import BenchmarkIoUMetric

__all__ = ['BenchmarkIoUMetric']
