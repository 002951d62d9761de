"""Neighbourhood components analysis loss (Goldberger et al., NeurIPS 2004), as a batch loss:

    p_i = Σ_{j: y_j = y_i, j≠i} softmax_j( −s · ‖x̂_i − x̂_j‖² ),    L = mean_i −log p_i

over the anchors that have at least one positive, with L2-normalised embeddings and ``s`` =
``softmax_scale``. Computed with log-sum-exps (no underflow). Same values as pytorch-metric-learning's
``NCALoss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metrix.distances import squared_euclidean
from metrix.losses._common import label_masks, mask_logits, prepare_batch, reduce


def nca_loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *, softmax_scale: float = 1.0,
             pairs=None) -> torch.Tensor:
    """NCA loss; 0 (with a gradient path) when no anchor has a positive."""
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    x = F.normalize(b.embeddings, dim=1)
    r = None if b.same_set else F.normalize(b.ref_embeddings, dim=1)
    logits = -softmax_scale * squared_euclidean(x, r)
    pos, neg = label_masks(b, logits.dtype, pairs)
    has_pos = pos.amax(dim=1)
    # fast path: one softmax over the allowed references (as pytorch-metric-learning does) ...
    probs = torch.softmax(mask_logits(logits, pos + neg), dim=1)
    p = (probs * pos).sum(dim=1)
    if bool((p[has_pos > 0] > 1e-30).all()):
        log_p = torch.log(p + (1.0 - has_pos))  # rows without positives: log 1 = 0, masked below
    else:  # ... but where a probability underflows, log-space sums keep every anchor (PML drops them)
        log_p = torch.logsumexp(mask_logits(logits, pos), dim=1) - torch.logsumexp(mask_logits(logits, pos + neg), dim=1)
    return reduce(-log_p * has_pos, torch.count_nonzero(has_pos), "mean", b.embeddings, b.ref_embeddings)


class NCALoss(nn.Module):
    """Module form of :func:`nca_loss`."""

    def __init__(self, softmax_scale: float = 1.0):
        super().__init__()
        self.softmax_scale = float(softmax_scale)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return nca_loss(embeddings, labels, ref_embeddings, ref_labels, softmax_scale=self.softmax_scale, pairs=pairs)
