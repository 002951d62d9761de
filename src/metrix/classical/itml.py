"""Information-Theoretic Metric Learning (Davis, Kulis, Jain, Sra & Dhillon, ICML 2007).

``min_{M ⪰ 0, ξ}  D_ld(M, M₀) + γ·D_ld(diag ξ, diag ξ₀)``  s.t.  ``d_M(similar pair) ≤ ξ_i`` and
``d_M(dissimilar pair) ≥ ξ_i``, with the LogDet divergence ``D_ld(M, M₀) = tr(M M₀⁻¹) − log det(M M₀⁻¹) − d``
and ``d_M`` the squared Mahalanobis distance; ``ξ₀`` is ``u`` for similar and ``ℓ`` for dissimilar pairs.

The paper solves this with cyclic Bregman projections, one constraint at a time (metric-learn runs
that loop in Python). Minimising over the slacks in closed form gives the same problem as a smooth
convex function of ``M`` alone: for a similar pair ``ξ_i = max(d_i, u)``, for a dissimilar pair
``ξ_i = min(d_i, ℓ)``, so the slack term becomes ``γ Σ h(max(d_i/u, 1)) + γ Σ h(min(d_i/ℓ, 1))`` with
``h(t) = t − log t − 1``. metrix minimises that with L-BFGS over ``M = LᵀL``: every iteration is one
GEMM over all constraints instead of a Python loop over them, and it reaches the same optimum.
"""

from __future__ import annotations

import numpy as np
import torch

from metrix.classical._base import MahalanobisLearner
from metrix.classical._optimize import as_torch
from metrix.classical._pairs import PairClassifierMixin


def itml_objective(L, V, labels, A0_inv, u, l, gamma):
    """ITML objective (LogDet divergence to the prior + γ·slack divergence) and its gradient in ``L``."""
    return _ITMLProblem(V, labels, A0_inv, u, l, gamma)(L)


class _ITMLProblem:
    def __init__(self, V, labels, A0_inv, u, l, gamma):
        self.V = as_torch(V)
        self.similar = torch.from_numpy(np.asarray(labels) == 1)
        self.bound = torch.where(self.similar, torch.tensor(float(u)), torch.tensor(float(l))).to(torch.float64)
        self.A0_inv = as_torch(A0_inv)
        self.logdet_A0 = -float(np.linalg.slogdet(A0_inv)[1])
        self.gamma = float(gamma)

    def __call__(self, L_np):
        L = as_torch(L_np)
        d_features = L.shape[1]
        sign, logabsdet = torch.linalg.slogdet(L)
        if sign == 0:
            return np.inf, np.zeros_like(L_np)
        VL = self.V @ L.T
        dist = (VL * VL).sum(1)
        t = dist / self.bound
        violated = torch.where(self.similar, t > 1, t < 1)
        if bool((violated & (t <= 0)).any()):
            return np.inf, np.zeros_like(L_np)  # a dissimilar pair collapsed onto a point
        t_active = torch.where(violated, t, torch.ones_like(t))
        slack = (t_active - torch.log(t_active) - 1.0).sum()
        LA = L @ self.A0_inv
        logdet_term = float((L * LA).sum()) - (2 * float(logabsdet) - self.logdet_A0) - d_features
        value = logdet_term + self.gamma * float(slack)
        # ∂/∂d_i of γ·h(d_i/b_i) = γ (1/b_i − 1/d_i) on violated constraints
        w = torch.where(violated, self.gamma * (1.0 / self.bound - 1.0 / dist.clamp(min=1e-300)), torch.zeros_like(t))
        grad = 2.0 * LA - 2.0 * torch.linalg.inv(L).T + 2.0 * (VL * w[:, None]).T @ self.V
        return value, grad.numpy()


def default_bounds(points: np.ndarray, A0: np.ndarray, random_state=None, max_points: int = 2000):
    """metric-learn's default targets: the 5th and 95th percentiles of the prior distances.

    metric-learn (and so most Python users' ITML) takes the percentiles of the *unsquared*
    distances between the distinct training points and uses them as bounds on *squared*
    distances; the authors' MATLAB code uses squared distances. metrix keeps metric-learn's
    convention so the two agree on the same data; pass ``bounds`` to choose others.
    """
    from sklearn.utils import check_random_state

    pts = np.unique(points, axis=0)
    if len(pts) > max_points:
        pts = pts[check_random_state(random_state).choice(len(pts), max_points, replace=False)]
    C = np.linalg.cholesky(A0)
    Z = pts @ C
    sq = (Z * Z).sum(1)
    D = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * Z @ Z.T, 0.0))
    u, l = np.percentile(D, (5, 95))
    if not u > 0:
        u = D[D > 0].min() if (D > 0).any() else 1.0
    return float(u), float(max(l, u))


class ITML(PairClassifierMixin, MahalanobisLearner):
    """Information-Theoretic Metric Learning.

    Parameters
    ----------
    gamma : float
        Weight of the slack divergence (metric-learn's and the paper's γ, default 1).
    n_constraints : int or None
        Similar and dissimilar pairs each drawn by ``fit(X, y)`` (default ``max(20·c², 2000)``; the paper used 20·c²).
    bounds : (u, ℓ) or None
        Squared-distance targets for similar / dissimilar pairs; default: see :func:`default_bounds`.
    prior : 'identity', 'covariance' or array
        ``M₀``: identity, the shrunk inverse covariance of the data, or a positive definite matrix.
    max_iter : int, tol : float, random_state, verbose

    Attributes
    ----------
    components_ (L, with M = LᵀL), bounds_, threshold_, n_iter_, objective_history_

    Example
    -------
    >>> from sklearn.datasets import load_iris
    >>> X, y = load_iris(return_X_y=True)
    >>> itml = ITML(random_state=0).fit(X, y)
    >>> itml.predict(X[[[0, 1], [0, 100]]]).tolist()
    [1, -1]
    """

    def __init__(self, gamma=1.0, n_constraints=None, bounds=None, prior="identity", max_iter=1000,
                 tol=1e-9, random_state=None, verbose=0):
        self.gamma = gamma
        self.n_constraints = n_constraints
        self.bounds = bounds
        self.prior = prior
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose

    def _prior(self, points: np.ndarray) -> np.ndarray:
        d = points.shape[1]
        if isinstance(self.prior, str):
            if self.prior == "identity":
                return np.eye(d)
            if self.prior == "covariance":
                from metrix.classical.covariance import Covariance

                return Covariance().fit(points).get_mahalanobis_matrix()
            raise ValueError(f"prior must be 'identity', 'covariance' or an array, got {self.prior!r}")
        A0 = np.asarray(self.prior, dtype=np.float64)
        if A0.shape != (d, d) or not np.allclose(A0, A0.T) or np.linalg.eigvalsh(A0).min() <= 0:
            raise ValueError(f"prior must be a symmetric positive definite ({d}, {d}) matrix")
        return A0

    def _learn_pairs(self, V, labels, points):
        if not self.gamma > 0:
            raise ValueError(f"gamma must be positive, got {self.gamma}")
        A0 = self._prior(points)
        prior_dist = np.einsum("ij,jk,ik->i", V, A0, V)
        # a dissimilar pair of identical points can never be pushed apart: it carries no information
        keep = (labels == 1) | (prior_dist > 0)
        V, labels, prior_dist = V[keep], labels[keep], prior_dist[keep]
        if not (labels == 1).any() or not (labels == -1).any():
            raise ValueError("ITML needs both similar and dissimilar pairs of distinct points")
        if self.bounds is None:
            u, l = default_bounds(points, A0, self.random_state)
        else:
            u, l = (float(b) for b in self.bounds)
            if not 0 < u <= l:
                raise ValueError(f"bounds must satisfy 0 < u <= l, got {self.bounds}")
        self.bounds_ = (float(u), float(l))
        L0 = np.linalg.cholesky(A0).T  # M₀ = L₀ᵀL₀: start at the prior
        problem = _ITMLProblem(V, labels, np.linalg.inv(A0), u, l, self.gamma)
        return self._minimize(problem, L0)
