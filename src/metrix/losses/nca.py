"""Neighbourhood components analysis loss (Goldberger et al., NeurIPS 2004), as a batch loss:

    p_i = Σ_{j: y_j = y_i, j≠i} softmax_j( −s · ‖x̂_i − x̂_j‖² ),    L = mean_i −log p_i

over the anchors that have at least one positive, with L2-normalised embeddings and ``s`` =
``softmax_scale``. Computed in log space (no underflow). Same values as pytorch-metric-learning's
``NCALoss``, except that PML drops an anchor whose probability underflows to 0 and this keeps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metrix.distances import squared_euclidean
from metrix.losses._common import label_masks, mask_logits, prepare_batch, reduce
from metrix.losses._matrix import positive_softmax_loss


def nca_loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *, softmax_scale: float = 1.0,
             pairs=None) -> torch.Tensor:
    """NCA loss; 0 (with a gradient path) when no anchor has a positive."""
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    if pairs is not None:
        return _mined_nca(b, softmax_scale, pairs)
    # on unit vectors −s‖x̂ − ŷ‖² = 2s·cos − 2s, and a softmax ignores the constant
    return positive_softmax_loss(b, 2.0 * softmax_scale, _log_of_positive_mass)


def _log_of_positive_mass(picked, valid):
    """``−log Σ_{p∈P(i)} prob(p)`` per anchor, in log space (no underflow), and its derivative
    ``−prob(p) / Σ_P prob`` at each positive."""
    log_mass = torch.logsumexp(torch.where(valid, picked, -torch.inf), dim=1, keepdim=True)
    return -log_mass.squeeze(1), -torch.exp(picked - log_mass)


def _mined_nca(b, softmax_scale: float, pairs) -> torch.Tensor:
    """A miner's selection: positives and the softmax restricted to the pairs it keeps."""
    x = F.normalize(b.embeddings, dim=1)
    r = None if b.same_set else F.normalize(b.ref_embeddings, dim=1)
    logits = -softmax_scale * squared_euclidean(x, r)
    pos, neg = label_masks(b, logits.dtype, pairs)
    has_pos = pos.amax(dim=1)
    log_p = torch.logsumexp(mask_logits(logits, pos), dim=1) - torch.logsumexp(mask_logits(logits, pos + neg), dim=1)
    return reduce(-log_p * has_pos, torch.count_nonzero(has_pos), "mean", b.embeddings, b.ref_embeddings)


class NCALoss(nn.Module):
    """Module form of :func:`nca_loss`."""

    def __init__(self, softmax_scale: float = 1.0):
        super().__init__()
        self.softmax_scale = float(softmax_scale)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return nca_loss(embeddings, labels, ref_embeddings, ref_labels, softmax_scale=self.softmax_scale, pairs=pairs)
