"""Mahalanobis Metric for Clustering (Xing, Ng, Jordan & Russell, NIPS 2002).

``max_M Σ_{dissimilar} d_M(x_i, x_j)``  s.t.  ``Σ_{similar} d_M(x_i, x_j)² ≤ 1``, ``M ⪰ 0``, with
``d_M`` the (unsquared) Mahalanobis distance. The constraint is active at the optimum and both
sides scale with ``M``, so this is the scale-free problem
``min  −log Σ_D d_M + ½ log Σ_S d_M²`` (for the diagonal case Xing et al. minimise the equivalent
``Σ_S d² − log Σ_D d``), solved with L-BFGS over ``M = LᵀL`` (full) or over ``diag M ≥ 0``
(diagonal, L-BFGS-B bounds), then scaled so that ``Σ_S d_M² = 1`` as in the paper.
"""

from __future__ import annotations

import numpy as np
import torch

from metrix.classical._base import MahalanobisLearner, initial_components
from metrix.classical._optimize import as_torch
from metrix.classical._pairs import PairClassifierMixin


def _ratio_terms(dist, similar, eps):
    """Objective and ∂/∂d_i of ``−log Σ_D √d + ½ log Σ_S d`` from the squared distances ``d``."""
    root = torch.sqrt(dist[~similar] + eps)
    sum_dis, sum_sim = root.sum(), dist[similar].sum()
    value = -torch.log(sum_dis) + 0.5 * torch.log(sum_sim)
    w = torch.empty_like(dist)
    w[~similar] = -0.5 / (root * sum_dis)
    w[similar] = 0.5 / sum_sim
    return float(value), w


def mmc_objective(L, V, labels, diagonal=False, eps=1e-12):
    """MMC's scale-free objective and its gradient in ``L`` (full) or in ``diag M`` (diagonal)."""
    return _MMCProblem(V, labels, diagonal, eps)(L)


class _MMCProblem:
    def __init__(self, V, labels, diagonal, eps):
        self.V = as_torch(V)
        self.V2 = self.V * self.V
        self.similar = torch.from_numpy(np.asarray(labels) == 1)
        self.diagonal = diagonal
        self.eps = eps

    def __call__(self, param):
        p = as_torch(param)
        if self.diagonal:
            dist = self.V2 @ p
        else:
            VL = self.V @ p.T
            dist = (VL * VL).sum(1)
        if float(dist[self.similar].sum()) <= 0:
            return np.inf, np.zeros_like(param)
        value, w = _ratio_terms(dist, self.similar, self.eps)
        grad = self.V2.T @ w if self.diagonal else 2.0 * (VL * w[:, None]).T @ self.V
        return value, grad.numpy()


class MMC(PairClassifierMixin, MahalanobisLearner):
    """Mahalanobis Metric for Clustering (Xing et al.), full or diagonal.

    Parameters
    ----------
    diagonal : bool
        Learn a diagonal ``M`` (feature weights) instead of a full one.
    n_constraints : int or None
        Similar and dissimilar pairs each drawn by ``fit(X, y)`` (default ``max(20·c², 2000)``).
    init : 'identity', 'random', or array
        Starting ``L`` for the full problem (the diagonal problem starts at ``diag M = 1``).
    max_iter, tol, random_state, verbose

    Example
    -------
    >>> from sklearn.datasets import load_iris
    >>> X, y = load_iris(return_X_y=True)
    >>> MMC(diagonal=True, random_state=0).fit(X, y).components_.shape
    (4, 4)
    """

    def __init__(self, diagonal=False, n_constraints=None, init="identity", max_iter=1000, tol=1e-9,
                 random_state=None, verbose=0):
        self.diagonal = diagonal
        self.n_constraints = n_constraints
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose

    def _learn_pairs(self, V, labels, points):
        if not (labels == 1).any() or not (labels == -1).any():
            raise ValueError("MMC needs both similar and dissimilar pairs")
        if not np.any(V[labels == 1]):
            raise ValueError("every similar pair joins identical points: Σ_S d² = 0 fixes no scale")
        d = V.shape[1]
        scale = np.mean(V * V) * d  # keeps eps relative to the data's squared distances
        problem = _MMCProblem(V, labels, self.diagonal, 1e-12 * max(scale, 1e-300))
        if self.diagonal:
            L = np.diag(np.sqrt(np.clip(self._minimize(problem, np.ones(d), bounds=[(0.0, None)] * d), 0.0, None)))
        else:
            L0 = initial_components(self.init, points, None, d, self.random_state)
            L = self._minimize(problem, L0)
        Z = V[labels == 1] @ L.T
        return L / np.sqrt((Z * Z).sum())  # Σ_S d_M² = 1, Xing et al.'s constraint
