"""Semantic correspondence with GATE features: SPair-71k's protocol, PCK@alpha.

Features of both images come from a frozen feature source (every variant, every feature).
Trained: an aggregation network -- per level, GATE's amalgamation of the variants, then a
bottleneck projection as in Diffusion Hyperfeatures, the levels mixed by learned softmax
weights -- learns from keypoint pairs with the symmetric contrastive loss (DHF's and the GATE
authors': cross-entropy over all positions of the other image, both directions, temperature
0.07). Training-free (DIFT-style): the taps' raw features, each L2-normalised, concatenated and
averaged over the variants. Matching: each source keypoint's feature (bilinear) against every
position of the target's feature map upsampled 4x; nearest neighbour by cosine similarity.
PCK@alpha: a prediction is correct within alpha * max(H, W) of the target image ("per image")
or alpha * max(h, w) of the target bounding box ("per bbox"); reported per keypoint over all
pairs (DHF's and the GATE authors' figure) and as a mean over pairs (DIFT's), per category and
overall.

Modules, one job each: ``features`` (cached and raw features), ``model`` (the aggregation
network and its checkpoints), ``matching`` (keypoint grids, the loss, nearest neighbours),
``metric`` (PCK), ``training``, ``pictures``, ``run`` (what ``tools/correspondence.py`` runs).
"""
from .features import FeatureCache, batch_features, raw_features
from .matching import keypoint_loss, match, to_grid
from .metric import evaluate, pck, summarize_pck
from .model import Bottleneck, CorrespondenceAggregator, load_aggregator, save_aggregator
from .pictures import draw_matches
from .training import aggregated, earlier_best, train_aggregator, validate

__all__ = ['FeatureCache', 'batch_features', 'raw_features', 'keypoint_loss', 'match',
           'to_grid', 'evaluate', 'pck', 'summarize_pck', 'Bottleneck',
           'CorrespondenceAggregator', 'load_aggregator', 'save_aggregator', 'draw_matches',
           'aggregated', 'earlier_best', 'train_aggregator', 'validate']
