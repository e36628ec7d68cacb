"""MMSeg's EncoderDecoder with GATE's amalgamation regulariser."""
from typing import Optional

import torch

from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS
from ..amalgamation import amalgamation_diversity, amalgamation_sparsity, sparsity_loss


@MODELS.register_module()
class GATEEncoderDecoder(EncoderDecoder):
    """``EncoderDecoder`` (same arguments, stock heads) plus the regulariser the authors add
    to GATE's amalgamation in their label-scarce and correspondence code.

    Per training step, with ``L`` the sum of the heads' losses and the assigners' softmax
    weights of every GATEBackbone level:

    - ``sparsity`` (lambda): pushes each channel towards one variant: a term whose gradient is
      ``-lambda * L / s * ds``, with ``s`` = :func:`amalgamation_sparsity` -- the authors'
      ``lambda * s * L.detach() / (-s.detach())``, shifted to be 0 in value so that the
      logged total stays the task loss;
    - ``diversity`` (mu): pushes several assigners (``num_assigners > 1``) to weigh the
      variants differently, by the same scheme on :func:`amalgamation_diversity`.

    The authors' lambda random-walks from 0; here it is fixed. Both are 0 by default, as in
    the paper's segmentation setting. The measures themselves are logged
    (``amalgamation_sparsity``, ``amalgamation_diversity``).

    Args:
        amalgamation_regularizer (dict, optional): ``dict(sparsity=0.0, diversity=0.0)``.
        **kwargs: ``EncoderDecoder``'s arguments.
    """

    def __init__(self, amalgamation_regularizer: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        settings = dict(sparsity=0.0, diversity=0.0)
        unknown = set(amalgamation_regularizer or {}) - set(settings)
        if unknown:
            raise KeyError(f'amalgamation_regularizer has unknown keys {sorted(unknown)}; use '
                           'sparsity and diversity.')
        settings.update(amalgamation_regularizer or {})
        self.sparsity_weight = float(settings['sparsity'])
        self.diversity_weight = float(settings['diversity'])

    def loss(self, inputs, data_samples) -> dict:
        losses = super().loss(inputs, data_samples)
        fusion = getattr(self.backbone, 'fusion', None)
        weights = [] if fusion is None else [
            a.weights_for_loss for a in fusion.amalgamations if a.weights_for_loss is not None]
        if not weights:
            return losses
        task = sum(v for k, v in losses.items() if 'loss' in k).detach()
        sparsity = torch.stack([amalgamation_sparsity(w) for w in weights]).mean()
        diversity = torch.stack([amalgamation_diversity(w) for w in weights]).mean()
        losses['amalgamation_sparsity'] = sparsity.detach()
        losses['amalgamation_diversity'] = diversity.detach()
        if self.sparsity_weight:
            losses['loss_amalgamation_sparsity'] = sparsity_loss(sparsity, task,
                                                                 self.sparsity_weight)
        if self.diversity_weight:
            losses['loss_amalgamation_diversity'] = self.diversity_weight * task * (
                diversity / diversity.detach().clamp(min=1e-8) - 1)
        return losses
