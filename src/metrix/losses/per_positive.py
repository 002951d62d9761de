"""Losses with one term per (anchor, positive) pair that sums over all of the anchor's references.

Each needs, for every anchor a and each of its positives p, a row over the R references: a (B, Pmax, R)
block, Pmax being the most positives any anchor has (K−1 in P×K batches). Blocks are built for chunks of
anchors so memory stays within ``_CHUNK_ELEMENTS`` whatever the batch size.

* Angular loss (Wang et al., "Deep Metric Learning with Angular Loss", ICCV 2017), per positive pair:
  ``log(1 + Σ_n e^{4 tan²α (x_a + x_p)·x_n − 2(1 + tan²α) x_a·x_p})`` on L2-normalised embeddings,
  averaged over positive pairs (α = 40°). Same values as pytorch-metric-learning's ``AngularLoss``.
* Smooth-AP (Brown et al., "Smooth-AP: Smoothing the Path Towards Large-Scale Image Retrieval", ECCV 2020):
  ``1 − mean_a AP_a`` with ``AP_a = 1/|P_a| Σ_{i∈P_a} (1 + Σ_{j∈P_a, j≠i} σ((s_j − s_i)/τ)) /
  (1 + Σ_{j∈Ω_a, j≠i} σ((s_j − s_i)/τ))``, cosine similarity ``s`` to the anchor, ``Ω_a`` all references but
  the anchor itself, τ = 0.01. (pytorch-metric-learning's ``SmoothAPLoss`` also ranks the query inside its own
  gallery and needs equal-size, grouped classes; this follows the paper.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metrix._validation import check_positive
from metrix.losses._common import label_masks, log1p_sum_exp, prepare_batch, reduce, zero_loss

_CHUNK_ELEMENTS = 2**24


def _pack(pos: torch.Tensor):
    """Each anchor's positives first: (B, Pmax) column indices and a 0/1 validity mask."""
    p_max = max(int(pos.sum(dim=1).max()), 1)
    valid, idx = torch.topk(pos, p_max, dim=1, sorted=False)
    return idx, valid


def _chunks(n_anchors: int, p_max: int, n_ref: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, p_max * n_ref))
    for start in range(0, n_anchors, step):
        yield slice(start, min(n_anchors, start + step))


def angular_loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *, alpha_degrees: float = 40.0,
                 pairs=None) -> torch.Tensor:
    """Angular loss, mean over positive pairs; 0 (with a gradient path) when there is none."""
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    x = F.normalize(b.embeddings, dim=1)
    r = x if b.same_set else F.normalize(b.ref_embeddings, dim=1)
    s_ar = x @ r.T  # anchor · reference
    s_rr = s_ar if b.same_set else r @ r.T  # positive · reference (positives are references)
    pos, neg = label_masks(b, s_ar.dtype, pairs)
    idx, valid = _pack(pos)
    t2 = math.tan(math.radians(alpha_degrees)) ** 2
    total = s_ar.new_zeros(())
    for rows in _chunks(x.shape[0], idx.shape[1], r.shape[0]):
        p_idx = idx[rows]
        s_ap = s_ar[rows].gather(1, p_idx)  # (c, Pmax)
        logits = 4 * t2 * (s_ar[rows][:, None, :] + s_rr[p_idx]) - 2 * (1 + t2) * s_ap[:, :, None]
        terms = log1p_sum_exp(logits, neg[rows][:, None, :].expand_as(logits), dim=2)
        total = total + (terms * valid[rows]).sum()
    count = int(torch.count_nonzero(valid))
    return total / count if count else zero_loss(b.embeddings, b.ref_embeddings)


class AngularLoss(nn.Module):
    """Module form of :func:`angular_loss`."""

    def __init__(self, alpha_degrees: float = 40.0):
        super().__init__()
        self.alpha_degrees = float(alpha_degrees)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return angular_loss(embeddings, labels, ref_embeddings, ref_labels, alpha_degrees=self.alpha_degrees, pairs=pairs)


def smooth_ap_loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *, temperature: float = 0.01,
                   pairs=None) -> torch.Tensor:
    """Smooth-AP loss ``1 − mean AP`` over anchors with positives; 0 (with a gradient path) if none has one."""
    temperature = check_positive(temperature, "temperature")
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    x = F.normalize(b.embeddings, dim=1)
    r = x if b.same_set else F.normalize(b.ref_embeddings, dim=1)
    s = x @ r.T
    pos, neg = label_masks(b, s.dtype, pairs)
    others = pos + neg  # Ω: every reference but the anchor itself
    idx, valid = _pack(pos)
    ap_sum = s.new_zeros(s.shape[0])
    for rows in _chunks(x.shape[0], idx.shape[1], r.shape[0]):
        p_idx = idx[rows]
        s_i = s[rows].gather(1, p_idx)  # (c, Pmax) similarity of each positive i
        sig = torch.sigmoid((s[rows][:, None, :] - s_i[:, :, None]) / temperature)  # (c, Pmax, R): j above i
        not_self = 1.0 - F.one_hot(p_idx, s.shape[1]).to(s.dtype)  # exclude j == i
        rank_all = 1.0 + (sig * others[rows][:, None, :] * not_self).sum(dim=2)
        rank_pos = 1.0 + (sig * pos[rows][:, None, :] * not_self).sum(dim=2)
        ap_sum[rows] = (rank_pos / rank_all * valid[rows]).sum(dim=1)
    n_pos = pos.sum(dim=1)
    has_pos = (n_pos > 0).to(s.dtype)
    losses = (1.0 - ap_sum / n_pos.clamp_min(1)) * has_pos
    return reduce(losses, torch.count_nonzero(has_pos), "mean", b.embeddings, b.ref_embeddings)


class SmoothAPLoss(nn.Module):
    """Module form of :func:`smooth_ap_loss`."""

    def __init__(self, temperature: float = 0.01):
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return smooth_ap_loss(embeddings, labels, ref_embeddings, ref_labels, temperature=self.temperature, pairs=pairs)
