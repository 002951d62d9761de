"""Generalized lifted structure loss (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person
Re-Identification", 2017, eq. on p. 4; a smooth relaxation of Oh Song et al.'s lifted structure, CVPR 2016):

    L_i = [ log Σ_{p∈P_i} e^{d_ip − m_pos} + log Σ_{n∈N_i} e^{m_neg − d_in} ]_+

with Euclidean distance ``d``, averaged over all anchors; an empty sum contributes 0.
Defaults ``m_pos=0, m_neg=1`` as in pytorch-metric-learning's ``GeneralizedLiftedStructureLoss``
(same values).
"""

from __future__ import annotations

import torch
from torch import nn

from metrix.distances import pairwise_distance
from metrix.losses._common import label_masks, masked_logsumexp, prepare_batch


def generalized_lifted_structure_loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *,
                                      pos_margin: float = 0.0, neg_margin: float = 1.0,
                                      metric: str = "euclidean", pairs=None) -> torch.Tensor:
    """Generalized lifted structure loss, mean over anchors."""
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    d = pairwise_distance(b.embeddings, None if b.same_set else b.ref_embeddings, metric)
    pos, neg = label_masks(b, d.dtype, pairs)
    return torch.relu(masked_logsumexp(d - pos_margin, pos) + masked_logsumexp(neg_margin - d, neg)).mean()


class GeneralizedLiftedStructureLoss(nn.Module):
    """Module form of :func:`generalized_lifted_structure_loss`."""

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, metric: str = "euclidean"):
        super().__init__()
        self.pos_margin, self.neg_margin, self.metric = float(pos_margin), float(neg_margin), metric

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return generalized_lifted_structure_loss(embeddings, labels, ref_embeddings, ref_labels,
                                                 pos_margin=self.pos_margin, neg_margin=self.neg_margin,
                                                 metric=self.metric, pairs=pairs)
