"""Weighted sums of losses."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MultipleLosses(nn.Module):
    """``Σ_k w_k · loss_k(embeddings, labels, ref_embeddings, ref_labels)``.

    Losses with learnable parameters (proxies, class weights) are registered as sub-modules, so their
    parameters appear in ``.parameters()`` and reach the optimizer. Proxy/classification losses do not take
    a reference set: give one only if every loss accepts it.

    Example
    -------
    >>> from metrix.losses import MultipleLosses, TripletMarginLoss, NormalizedSoftmaxLoss
    >>> loss = MultipleLosses([TripletMarginLoss(0.1), NormalizedSoftmaxLoss(10, 64)], weights=[1.0, 0.5])
    """

    def __init__(self, losses: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        if not losses:
            raise ValueError("MultipleLosses needs at least one loss")
        weights = [1.0] * len(losses) if weights is None else [float(w) for w in weights]
        if len(weights) != len(losses):
            raise ValueError(f"{len(losses)} losses but {len(weights)} weights")
        self.losses = nn.ModuleList(losses)
        self.weights = weights

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None) -> torch.Tensor:
        total = None
        for w, loss in zip(self.weights, self.losses):
            if ref_embeddings is None:
                value = loss(embeddings, labels)
            else:
                value = loss(embeddings, labels, ref_embeddings, ref_labels)
            total = w * value if total is None else total + w * value
        return total
