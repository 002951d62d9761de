"""Relevant Component Analysis (Bar-Hillel, Hertz, Shental & Weinshall, ICML 2003 / JMLR 2005).

Samples known to belong together form *chunklets* (here: the classes). RCA whitens the
within-chunklet covariance ``Ĉ = (1/N) Σ_chunklets Σ_{x∈c} (x − m_c)(x − m_c)ᵀ``, so irrelevant
variability (large inside chunklets) is scaled down: ``M = Ĉ⁻¹``.
"""

from __future__ import annotations

import numpy as np

from metrix.classical._base import MahalanobisLearner, encode_classes, range_basis, whitened_generalized_eigh


def within_class_scatter(Z: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``Σ_c Σ_{x∈c} (x − m_c)(x − m_c)ᵀ / N`` (biased within-class covariance)."""
    n_classes = codes.max() + 1
    counts = np.bincount(codes, minlength=n_classes)
    means = np.zeros((n_classes, Z.shape[1]))
    np.add.at(means, codes, Z)
    means /= counts[:, None]
    R = Z - means[codes]
    return R.T @ R / len(Z)


class RCA(MahalanobisLearner):
    """Relevant Component Analysis with classes as chunklets.

    Parameters
    ----------
    n_components : int or None
        Keep the whitened directions with the largest total-to-within variance ratio
        (default: all directions in the span of the data).
    regularization : float
        Ridge ``r·tr(Ĉ)/d`` added to ``Ĉ`` so that a direction with no within-class variance
        (a perfect discriminator, or too few samples) gets a large but finite weight.

    Example
    -------
    >>> from sklearn.datasets import load_iris
    >>> X, y = load_iris(return_X_y=True)
    >>> RCA(n_components=2).fit(X, y).transform(X).shape
    (150, 2)
    """

    def __init__(self, n_components=None, regularization=1e-3):
        self.n_components = n_components
        self.regularization = regularization

    def _learn(self, X, y):
        _, codes = encode_classes(y)
        if np.bincount(codes).max() < 2:
            raise ValueError("RCA needs a class (chunklet) with at least two samples")
        mean, U = range_basis(X)
        Z = (X - mean) @ U
        n_components = min(self._n_components(X.shape[1]), U.shape[1])
        total = Z.T @ Z / len(Z)
        _, V = whitened_generalized_eigh(total, within_class_scatter(Z, codes), self.regularization)
        return (U @ V[:, :n_components]).T
