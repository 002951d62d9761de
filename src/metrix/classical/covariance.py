"""Mahalanobis distance from the data covariance, ``M = Σ⁻¹`` (Mahalanobis 1936), with shrinkage."""

from __future__ import annotations

import numpy as np
from sklearn.covariance import ledoit_wolf

from metrix.classical._base import MahalanobisLearner


class Covariance(MahalanobisLearner):
    """Whitening metric ``M = Σ⁻¹`` of the (shrunk) data covariance; ``y`` is ignored.

    Parameters
    ----------
    shrinkage : 'auto', float in [0, 1]
        'auto': Ledoit–Wolf; a float blends ``(1 − s) Σ + s·(tr Σ / d)·I``. With 0 the inverse
        is a pseudo-inverse: directions of zero variance get weight 0 (rank-deficient data works).
    n_components : int or None
        Keep the directions of largest variance (PCA whitening) when given.

    Example
    -------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(100, 3)) * [1, 10, 100]
    >>> Z = Covariance(shrinkage=0).fit(X).transform(X)
    >>> bool(np.allclose(np.cov(Z, rowvar=False, bias=True), np.eye(3), atol=1e-8))
    True
    """

    _unsupervised = True

    def __init__(self, shrinkage="auto", n_components=None):
        self.shrinkage = shrinkage
        self.n_components = n_components

    def _learn(self, X, y=None):
        n_components = self._n_components(X.shape[1])
        if isinstance(self.shrinkage, str):
            if self.shrinkage != "auto":
                raise ValueError(f"shrinkage must be 'auto' or a float in [0, 1], got {self.shrinkage!r}")
            cov = ledoit_wolf(X)[0]
        else:
            s = float(self.shrinkage)
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"shrinkage must be in [0, 1], got {s}")
            cov = np.cov(X, rowvar=False, bias=True).reshape(X.shape[1], X.shape[1])
            cov = (1 - s) * cov + s * np.trace(cov) / X.shape[1] * np.eye(X.shape[1])
        vals, vecs = np.linalg.eigh(cov)
        vals, vecs = vals[::-1], vecs[:, ::-1]
        if vals[0] <= 0:
            raise ValueError("every feature is constant: the covariance is zero")
        keep = vals > vals[0] * 1e-12  # pseudo-inverse: zero-variance directions get weight 0
        scale = np.where(keep, 1.0 / np.sqrt(np.where(keep, vals, 1.0)), 0.0)
        return (vecs * scale).T[:n_components]
