"""Spectral (closed-form) metric learners: Local Fisher Discriminant Analysis and the trace-constrained FDA.

Both reduce to an eigenproblem on scatter matrices, solved inside the span of the data so that
rank-deficient inputs work.
"""

from __future__ import annotations

import numpy as np

from metrix.classical._base import MahalanobisLearner, encode_classes, range_basis, whitened_generalized_eigh
from metrix.classical.rca import within_class_scatter


def _laplacian_scatter(Z: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``½ Σ_ij W_ij (z_i − z_j)(z_i − z_j)ᵀ = Zᵀ (diag(W1) − W) Z`` for symmetric ``W``."""
    return Z.T @ (Z * W.sum(1)[:, None]) - Z.T @ W @ Z


def _local_affinity(Zc: np.ndarray, k: int) -> np.ndarray:
    """Local-scaling affinity ``exp(−||z_i − z_j||² / (σ_i σ_j))``, σ_i = distance to the k-th neighbour."""
    sq = (Zc * Zc).sum(1)
    D = np.maximum(sq[:, None] + sq[None, :] - 2 * Zc @ Zc.T, 0.0)
    kk = min(k, len(Zc) - 1)
    sigma = np.sqrt(np.sort(D, axis=1)[:, kk]) if kk > 0 else np.ones(len(Zc))
    sigma = np.maximum(sigma, 1e-12 * max(sigma.max(), 1e-300))
    return np.exp(-D / np.outer(sigma, sigma))


class LFDA(MahalanobisLearner):
    """Local Fisher Discriminant Analysis (Sugiyama, JMLR 2007).

    Fisher discriminant analysis with pairs weighted by a local-scaling affinity, so that
    multi-modal classes keep their local structure: maximise the local between-class scatter
    relative to the local within-class scatter.

    Parameters
    ----------
    n_components : int or None
    k : int
        Neighbour used for the local scaling σ_i (paper: 7).
    embedding_type : 'weighted' (eigenvectors scaled by √λ, paper default), 'orthonormalized' or 'plain'
    regularization : float
        Ridge on the within-class scatter, relative to its trace.

    Example
    -------
    >>> from sklearn.datasets import load_iris
    >>> X, y = load_iris(return_X_y=True)
    >>> LFDA(n_components=2).fit(X, y).transform(X).shape
    (150, 2)
    """

    def __init__(self, n_components=None, k=7, embedding_type="weighted", regularization=1e-4):
        self.n_components = n_components
        self.k = k
        self.embedding_type = embedding_type
        self.regularization = regularization

    def _learn(self, X, y):
        if self.embedding_type not in ("weighted", "orthonormalized", "plain"):
            raise ValueError(f"embedding_type must be 'weighted', 'orthonormalized' or 'plain', got {self.embedding_type!r}")
        if int(self.k) < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        _, codes = encode_classes(y)
        mean, U = range_basis(X)
        Z = (X - mean) @ U
        n, r = Z.shape
        n_components = min(self._n_components(X.shape[1]), r)
        S_w = np.zeros((r, r))
        S_local = np.zeros((r, r))  # Σ_c of the class-local term of the mixture scatter
        for c in range(codes.max() + 1):
            Zc = Z[codes == c]
            if len(Zc) < 2:
                continue
            A = _local_affinity(Zc, int(self.k))
            S_w += _laplacian_scatter(Zc, A) / len(Zc)
            # between weights: A_ij (1/n − 1/n_c) inside a class, 1/n across classes
            S_local += _laplacian_scatter(Zc, A) / n - _laplacian_scatter(Zc, np.ones_like(A)) / n
        # Σ_ij over all pairs with unit weight is n·ZᵀZ for centred Z; class-local terms replace it inside classes
        S_b = Z.T @ Z + S_local - S_w
        vals, V = whitened_generalized_eigh(S_b, S_w, self.regularization)
        vals, V = np.clip(vals[:n_components], 0.0, None), V[:, :n_components]
        if self.embedding_type == "weighted":
            V = V * np.sqrt(vals)
        elif self.embedding_type == "orthonormalized":
            V, _ = np.linalg.qr(V)
        return (U @ V).T


class FDA(MahalanobisLearner):
    """Fisher-style discriminant metric from label pairs, solved by eigen-decomposition.

    ``objective='difference'`` (the default, the trace-constrained form): minimise
    ``tr(W S_s) − tr(W S_d)`` subject to ``W ⪰ 0`` and ``tr(W) = 1``, where ``S_s``/``S_d`` are the
    mean outer products of the differences of similar/dissimilar pairs. With ``W = LᵀL`` and ``L``
    of ``n_components`` orthogonal rows of equal norm, the optimum is spanned by the eigenvectors of
    ``S_s − S_d`` with the smallest eigenvalues (by default: all negative ones, i.e. every direction
    in which dissimilar pairs spread more than similar ones).

    ``objective='ratio'`` is classical Fisher discriminant analysis: maximise between-class over
    within-class scatter (a generalised eigenproblem), keep ``c − 1`` directions by default, scaled
    so that the within-class covariance is the identity.

    Example
    -------
    >>> from sklearn.datasets import load_iris
    >>> X, y = load_iris(return_X_y=True)
    >>> import numpy as np
    >>> W = FDA().fit(X, y).get_mahalanobis_matrix()
    >>> round(float(abs(np.trace(W))), 6)
    1.0
    """

    def __init__(self, n_components=None, objective="difference", regularization=1e-4):
        self.n_components = n_components
        self.objective = objective
        self.regularization = regularization

    def _learn(self, X, y):
        if self.objective not in ("difference", "ratio"):
            raise ValueError(f"objective must be 'difference' or 'ratio', got {self.objective!r}")
        _, codes = encode_classes(y)
        mean, U = range_basis(X)
        Z = (X - mean) @ U
        n, r = Z.shape
        counts = np.bincount(codes)
        within = within_class_scatter(Z, codes) * n  # Σ_c Σ_{x∈c} (x − m_c)(x − m_c)ᵀ
        total = Z.T @ Z  # Z is centred
        if self.objective == "ratio":
            # Fisher's criterion: at most c − 1 directions, scaled so that the within-class
            # scatter is white (scikit-learn's LinearDiscriminantAnalysis.transform convention)
            default = min(len(counts) - 1, r)
            n_components = default if self.n_components is None else min(self._n_components(X.shape[1]), r)
            _, V = whitened_generalized_eigh(total - within, within / n, self.regularization)
            return (U @ V[:, :n_components]).T
        # Σ over ordered pairs (i, j) of (z_i − z_j)(z_i − z_j)ᵀ: 2 n_c·(class scatter) inside a
        # class, 2 n·(total scatter) over all pairs
        per_class = np.zeros((r, r))
        for c, n_c in enumerate(counts):
            Zc = Z[codes == c]
            Rc = Zc - Zc.mean(0)
            per_class += 2 * n_c * (Rc.T @ Rc)
        n_similar = float((counts * (counts - 1)).sum())
        n_dissimilar = float(n * n - (counts**2).sum())
        if n_similar == 0:
            raise ValueError("FDA needs a class with at least two samples")
        S_s = per_class / n_similar
        S_d = (2 * n * total - per_class) / n_dissimilar
        vals, V = np.linalg.eigh((S_s - S_d + (S_s - S_d).T) / 2)
        if self.n_components is None:
            n_components = max(int((vals < 0).sum()), 1)
        else:
            n_components = min(self._n_components(X.shape[1]), r)
        V = V[:, :n_components] / np.sqrt(n_components)  # orthogonal rows, tr(LᵀL) = 1
        return (U @ V).T
