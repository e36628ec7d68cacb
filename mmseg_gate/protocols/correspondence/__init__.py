"""Semantic correspondence with GATE features: SPair-71k's protocol, PCK@alpha.

Features of both images come from a frozen feature source (every variant, every feature; the
shipped recipe: the authors' six variants beside their separate cross-attention run).
Trained: the authors' aggregation network (one amalgamation of the variants' concatenated
features, the attention maps concatenated, a 3x3 conv or none), or Diffusion Hyperfeatures'
(per level GATE's amalgamation, a bottleneck projection, learned level mixing), learns from
keypoint pairs with the symmetric contrastive loss (cross-entropy over all positions of the
other image, both directions, temperature 0.07). Training-free (DIFT-style): the taps' raw
features, each L2-normalised, concatenated and averaged over the variants; several sources
normalised and concatenated (SD-DINO). Matching: cosine nearest neighbour, at 512x512 as the
authors or with the target upsampled 4x. PCK@alpha (``mmseg_gate/evaluation/pck.py``): a
prediction is correct within alpha * max(H, W) of the target image ("per image") or alpha *
max(h, w) of the target bounding box ("per bbox"); per keypoint over all pairs (DHF's and the
GATE authors' figure) and as a mean over pairs (DIFT's), per category and overall.

Modules, one job each: ``features`` (split files, cached and raw features), ``matching``
(keypoint grids, the loss, nearest neighbours), ``metric`` (matching a split, scored by
``PCKMetric``), ``training`` (resumable, distributed), ``pictures``, ``run`` (what
``tools/correspondence.py`` runs). The trainable aggregation networks and their checkpoints are
models: ``mmseg_gate.models.correspondence``.
"""
from ...evaluation.pck import pck, summarize_pck
from .features import FeatureCache, batch_features, raw_features
from .matching import keypoint_loss, match, to_grid
from .metric import evaluate
from .pictures import draw_matches
from .training import aggregated, earlier_best, train_aggregator, validate

__all__ = ['FeatureCache', 'batch_features', 'raw_features', 'keypoint_loss', 'match',
           'to_grid', 'evaluate', 'pck', 'summarize_pck', 'draw_matches',
           'aggregated', 'earlier_best', 'train_aggregator', 'validate']
