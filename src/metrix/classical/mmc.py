"""Mahalanobis Metric for Clustering (Xing, Ng, Jordan & Russell, NIPS 2002).

``max_M Σ_{dissimilar} d_M(x_i, x_j)``  s.t.  ``Σ_{similar} d_M(x_i, x_j)² ≤ 1``, ``M ⪰ 0``, with
``d_M`` the (unsquared) Mahalanobis distance. The constraint is active at the optimum and both
sides scale with ``M``, so this is the scale-free problem
``min  −log Σ_D d_M + ½ log Σ_S d_M²`` (for the diagonal case Xing et al. minimise the equivalent
``Σ_S d² − log Σ_D d``), solved with L-BFGS over ``M = LᵀL`` (full) or over ``diag M ≥ 0``
(diagonal, L-BFGS-B bounds), then scaled so that ``Σ_S d_M² = 1`` as in the paper.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
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
            free = ~_unbounded_features(V, labels)
            w0 = free.astype(float)
            bounds = [(0.0, None) if f else (0.0, 0.0) for f in free]
            L = np.diag(np.sqrt(np.clip(self._minimize(problem, w0, bounds=bounds), 0.0, None)))
        else:
            L0 = initial_components(self.init, points, None, d, self.random_state)
            Q = _bounded_subspace(V, labels)
            if Q is None:
                L = self._minimize(problem, L0)
            else:  # optimise L = L_q Qᵀ: the metric is 0 along the unbounded directions
                L = self._minimize(_MMCProblem(V @ Q, labels, False, problem.eps), L0 @ Q) @ Q.T
        Z = V[labels == 1] @ L.T
        return L / np.sqrt((Z * Z).sum())  # Σ_S d_M² = 1, Xing et al.'s constraint


_UNBOUNDED_WARNING = (
    "MMC: {n} direction(s) of the features vary across dissimilar pairs but not within any similar pair; "
    "Xing et al.'s objective grows without bound along them, so the learned metric ignores them "
    "(more or other similar pairs would constrain them)"
)


def _null_tolerance(gram: np.ndarray) -> float:
    return max(float(np.abs(gram).max()), 1e-300) * gram.shape[0] * np.finfo(np.float64).eps * 10


def _bounded_subspace(V, labels):
    """An orthonormal basis (D, q) of the directions along which the objective is bounded, or None when
    that is every direction. Unbounded: no spread within similar pairs (the null space of Σ_S ΔΔᵀ) but some
    across dissimilar pairs — scaling M along such a direction raises Σ_D d without touching Σ_S d²."""
    similar, dissimilar = V[labels == 1], V[labels == -1]
    gram_s = similar.T @ similar
    values, vectors = np.linalg.eigh(gram_s)
    null = vectors[:, values <= _null_tolerance(gram_s)]
    if not null.shape[1]:
        return None
    across = dissimilar @ null
    spread = across.T @ across
    values, inner = np.linalg.eigh(spread)
    unbounded = null @ inner[:, values > _null_tolerance(dissimilar.T @ dissimilar)]
    if not unbounded.shape[1]:
        return None
    warnings.warn(_UNBOUNDED_WARNING.format(n=unbounded.shape[1]), RuntimeWarning, stacklevel=4)
    return scipy.linalg.null_space(unbounded.T)


def _unbounded_features(V, labels) -> np.ndarray:
    """Diagonal case: the features with no spread within similar pairs but some across dissimilar ones."""
    spread_s = (V[labels == 1] ** 2).sum(axis=0)
    spread_d = (V[labels == -1] ** 2).sum(axis=0)
    unbounded = (spread_s <= spread_s.max() * np.finfo(np.float64).eps * 10) & (spread_d > 0)
    if unbounded.any():
        warnings.warn(_UNBOUNDED_WARNING.format(n=int(unbounded.sum())), RuntimeWarning, stacklevel=4)
    return unbounded
