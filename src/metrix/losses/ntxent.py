"""NT-Xent / InfoNCE in the supervised-contrastive form (Khosla et al., "Supervised Contrastive
Learning", NeurIPS 2020, L_out; Chen et al., SimCLR, ICML 2020 when each sample has one positive):

    L = 1/|A⁺| Σ_{i∈A⁺} −1/|P(i)| Σ_{p∈P(i)} log( e^{s_ip/τ} / Σ_{a∈A(i)} e^{s_ia/τ} )

``s`` is cosine similarity, ``P(i)`` the items sharing i's label (i itself excluded), ``A(i)`` every
item but i, and ``A⁺`` the anchors with at least one positive. Any number of positives per anchor
works in O(B·R) memory; with two views per sample (labels = sample ids) this is exactly SimCLR's
NT-Xent. Values equal pytorch-metric-learning's ``SupConLoss``, and its ``NTXentLoss`` when each
anchor has one positive (with several, PML's NTXent puts only one positive in each denominator).
"""

from __future__ import annotations

import torch
from torch import nn

from metrix._validation import check_positive
from metrix.distances import cosine_similarity
from metrix.losses._common import label_masks, mask_logits, prepare_batch, reduce
from metrix.losses._matrix import positive_softmax_loss


def ntxent_loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *, temperature: float = 0.1,
                pairs=None) -> torch.Tensor:
    """Supervised NT-Xent; returns 0 (with a gradient path) if no anchor has a positive."""
    temperature = check_positive(temperature, "temperature")
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    if pairs is not None:
        return _mined_ntxent(b, temperature, pairs)
    return positive_softmax_loss(b, 1.0 / temperature, _mean_of_positives)


def _mean_of_positives(picked, valid):
    """``−1/|P(i)| Σ_p log prob(p)`` per anchor and its derivative ``−1/|P(i)|`` at each positive."""
    n_pos = valid.sum(dim=1, keepdim=True).clamp_min(1).to(picked.dtype)
    per_anchor = -torch.where(valid, picked, 0.0).sum(dim=1) / n_pos.squeeze(1)  # self slots hold −inf
    return per_anchor, (-1.0 / n_pos).expand_as(picked)


def _mined_ntxent(b, temperature: float, pairs) -> torch.Tensor:
    """A miner's selection: positives and the denominator restricted to the pairs it keeps."""
    logits = cosine_similarity(b.embeddings, None if b.same_set else b.ref_embeddings) / temperature
    pos, neg = label_masks(b, logits.dtype, pairs)
    # denominator over the kept pairs; a row with none gets a finite dummy (no positive: unused)
    denom = torch.logsumexp(mask_logits(logits, pos + neg), dim=1, keepdim=True)
    n_pos = pos.sum(dim=1)
    per_anchor = -((logits - denom) * pos).sum(dim=1) / n_pos.clamp_min(1)
    return reduce(per_anchor, torch.count_nonzero(n_pos), "mean", b.embeddings, b.ref_embeddings)


class NTXentLoss(nn.Module):
    """Module form of :func:`ntxent_loss`.

    Example (SimCLR: two views of 4 images)
    -------
    >>> import torch
    >>> views = torch.randn(8, 16); ids = torch.arange(4).repeat(2)
    >>> NTXentLoss(temperature=0.5)(views, ids).item() > 0
    True
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return ntxent_loss(embeddings, labels, ref_embeddings, ref_labels, temperature=self.temperature, pairs=pairs)
