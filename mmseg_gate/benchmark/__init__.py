"""Cost measurement: a config's backbone forward as built (``cost``) against the
straightforward way the authors' code computes the same features (``naive``)."""
from .cost import benchmark, benchmark_naive, compare, measure, with_backbone
from .naive import NaiveGATE

__all__ = ['benchmark', 'benchmark_naive', 'compare', 'measure', 'with_backbone', 'NaiveGATE']
