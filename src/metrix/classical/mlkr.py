"""Metric Learning for Kernel Regression (Weinberger & Tesauro, AISTATS 2007).

Minimises the leave-one-out error of Nadaraya–Watson regression with a Gaussian kernel in the
learned space: ``ŷ_i = Σ_{j≠i} k_ij y_j / Σ_{j≠i} k_ij``, ``k_ij = exp(−||L(x_i − x_j)||²)``,
objective ``Σ_i (ŷ_i − y_i)²``.
"""

from __future__ import annotations

import numpy as np
import torch

from metrix.classical._base import MahalanobisLearner, initial_components
from metrix.classical._optimize import as_torch, scatter_gradient, squared_distances


def mlkr_objective(L: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """MLKR loss and its gradient with respect to ``L``."""
    return _mlkr_value_grad(as_torch(L), as_torch(X), as_torch(np.asarray(y, dtype=np.float64).ravel()))


def _mlkr_value_grad(L, X, y):
    E = X @ L.T
    D = squared_distances(E)
    D.fill_diagonal_(float("inf"))
    P = torch.softmax(-D, dim=1)
    y_hat = P @ y
    residual = y_hat - y
    # ∂ŷ_i/∂D_ij = −p_ij (y_j − ŷ_i)  ⇒  ∂loss/∂D_ij = −2 r_i p_ij (y_j − ŷ_i)
    W = -2.0 * residual[:, None] * P * (y[None, :] - y_hat[:, None])
    return float((residual * residual).sum()), scatter_gradient(E, X, W).numpy()


class MLKR(MahalanobisLearner):
    """Metric Learning for Kernel Regression (``y`` are real-valued regression targets).

    Parameters
    ----------
    n_components : int or None
    init : 'auto' (PCA when reducing the dimension, else identity), 'pca', 'identity', 'random' or array
    max_iter : int (default 1000), tol : float, random_state, verbose

    Example
    -------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(50, 3)); y = X[:, 0] * 2
    >>> MLKR(max_iter=20).fit(X, y).components_.shape
    (3, 3)
    """

    _classification = False

    def __init__(self, n_components=None, init="auto", max_iter=1000, tol=1e-6, random_state=None, verbose=0):
        self.n_components = n_components
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose

    def _learn(self, X, y):
        y = np.asarray(y, dtype=np.float64).ravel()
        if not np.isfinite(y).all():
            raise ValueError("y contains NaN or infinity")
        n_components = self._n_components(X.shape[1])
        L0 = initial_components(self.init, X, None, n_components, self.random_state)
        Xt, yt = as_torch(X), as_torch(y)
        return self._minimize(lambda L: _mlkr_value_grad(as_torch(L), Xt, yt), L0)
