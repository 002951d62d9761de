"""Shared machinery of the classical (linear) metric learners.

Every learner finds a linear map ``L`` (``components_``, shape ``(n_components, n_features)``)
so that the learned distance is ``d(x, y) = ||L x - L y||`` and its Mahalanobis matrix is
``M = LᵀL ⪰ 0``. The base class gives all of them the scikit-learn transformer contract
(``fit`` returns self, fitted attributes end in ``_``, input validated up front) and the
metric helpers: ``transform``, ``get_mahalanobis_matrix``, ``pair_distance`` and
``get_metric`` (a callable usable as ``KNeighborsClassifier(metric=...)``).
"""

from __future__ import annotations

import contextlib
import numbers
import time

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from metrix._validation import label_codes
from metrix.classical._optimize import lbfgs


class MahalanobisDistance:
    """Picklable callable ``f(u, v) = ||L(u - v)||`` for scikit-learn's ``metric=`` arguments."""

    def __init__(self, components: np.ndarray):
        self.components = np.asarray(components, dtype=np.float64)

    def __call__(self, u, v) -> float:
        diff = self.components @ (np.asarray(u, dtype=np.float64) - np.asarray(v, dtype=np.float64))
        return float(np.sqrt(diff @ diff))


def check_pairs(pairs, n_features: int | None = None) -> np.ndarray:
    """Validate an array of pairs: shape ``(n_pairs, 2, n_features)``, finite, float64."""
    pairs = np.asarray(pairs)
    if pairs.ndim != 3 or pairs.shape[1] != 2:
        raise ValueError(
            f"pairs must have shape (n_pairs, 2, n_features), got {pairs.shape}; "
            "build them with metrix.classical.pairs_from_labels"
        )
    if pairs.shape[0] == 0:
        raise ValueError("pairs is empty")
    if not np.issubdtype(pairs.dtype, np.number) or np.issubdtype(pairs.dtype, np.complexfloating):
        raise ValueError(f"pairs must be real numbers, got dtype {pairs.dtype}")
    pairs = pairs.astype(np.float64, copy=False)
    if not np.isfinite(pairs).all():
        raise ValueError("pairs contain NaN or infinity")
    if n_features is not None and pairs.shape[2] != n_features:
        raise ValueError(f"pairs have {pairs.shape[2]} features, the estimator was fitted with {n_features}")
    return pairs


def encode_classes(y) -> tuple[np.ndarray, np.ndarray]:
    """Classes and integer codes of ``y``; at least two classes are required."""
    (codes,), classes = label_codes(y)
    if len(classes) < 2:
        raise ValueError(
            f"metric learning needs at least two classes, y has one class ({classes[0]!r}); "
            "there is nothing to separate"
        )
    return classes, codes


#: below this many samples the per-iteration work is too small to share between threads
_SINGLE_THREAD_BELOW = 600


@contextlib.contextmanager
def threads_for(n_samples: int):
    """Thread settings for a fit: torch does the heavy work, NumPy/SciPy's BLAS stays on one thread.

    Between two torch evaluations SciPy's L-BFGS calls its own OpenBLAS; two thread pools that
    both spin-wait on two cores slowed LMNN on digits 3-4x. On small matrices torch's own pool
    costs more than the work, so small problems run on one torch thread too.
    """
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    if n_samples < _SINGLE_THREAD_BELOW and previous > 1:
        torch.set_num_threads(1)
    try:
        if n_samples < _SINGLE_THREAD_BELOW:
            yield  # BLAS work is tiny here, and limiting the pools costs about a millisecond
        else:
            with threadpool_limits(limits=1, user_api="blas"):
                yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


class MahalanobisLearner(TransformerMixin, BaseEstimator):
    """Base of every linear metric learner; subclasses implement ``_learn(X, y) -> L``."""

    #: whether ``fit`` needs ``y`` to be class labels (False: regression targets, e.g. MLKR)
    _classification = True
    #: whether ``fit`` ignores ``y`` (e.g. Covariance)
    _unsupervised = False

    def fit(self, X, y=None):
        """Learn the metric from samples ``X`` (n_samples, n_features) and targets ``y``.

        Returns
        -------
        self
        """
        if self._unsupervised:
            X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        else:
            if y is None:
                raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
            X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=not self._classification,
                                 ensure_min_samples=2)
        start = time.perf_counter()
        if "max_iter" in self.get_params():  # iterative: torch + SciPy's L-BFGS in one loop
            with threads_for(X.shape[0]):
                components = self._learn(X, y)
        else:
            components = self._learn(X, y)
        self.components_ = np.ascontiguousarray(components, dtype=np.float64)
        self.fit_time_ = time.perf_counter() - start
        return self

    def _learn(self, X, y) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def transform(self, X) -> np.ndarray:
        """Map samples into the learned space, ``X Lᵀ`` (Euclidean distance there = learned metric)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return X @ self.components_.T

    def get_mahalanobis_matrix(self) -> np.ndarray:
        """The learned ``M = LᵀL`` (symmetric positive semi-definite, n_features × n_features)."""
        check_is_fitted(self)
        L = self.components_
        M = L.T @ L
        return (M + M.T) / 2

    def pair_distance(self, pairs) -> np.ndarray:
        """Learned distance of each pair; ``pairs`` has shape ``(n_pairs, 2, n_features)``."""
        check_is_fitted(self)
        pairs = check_pairs(pairs, self.n_features_in_)
        diff = (pairs[:, 0] - pairs[:, 1]) @ self.components_.T
        return np.sqrt(np.einsum("ij,ij->i", diff, diff))

    def get_metric(self) -> MahalanobisDistance:
        """A picklable ``f(u, v)`` giving the learned distance, for ``metric=`` arguments.

        >>> from sklearn.neighbors import KNeighborsClassifier
        >>> knn = KNeighborsClassifier(metric=learner.get_metric())  # doctest: +SKIP
        """
        check_is_fitted(self)
        return MahalanobisDistance(self.components_.copy())

    def _n_components(self, n_features: int) -> int:
        n = self.n_components
        if n is None:
            return n_features
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n_components must be a positive integer or None, got {n!r}")
        if n > n_features:
            raise ValueError(f"n_components={n} is larger than the number of features ({n_features})")
        return int(n)

    def _minimize(self, objective, L0, bounds=None):
        """L-BFGS with the learner's ``max_iter``/``tol``/``verbose``; records ``n_iter_`` and
        ``objective_history_`` and returns the minimiser."""
        result = lbfgs(objective, L0, max_iter=self.max_iter, tol=self.tol, log=self._log, bounds=bounds)
        self.n_iter_, self.objective_history_ = result.n_iter, result.history
        return result.L

    def _log(self, message: str) -> None:
        if getattr(self, "verbose", 0):
            print(f"[{type(self).__name__}] {message}", flush=True)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = not self._unsupervised
        return tags


def initial_components(init, X: np.ndarray, y: np.ndarray | None, n_components: int,
                       random_state) -> np.ndarray:
    """Starting ``L`` for the iterative learners (same rules as scikit-learn's NCA).

    ``init``: 'auto' (LDA when ``n_components <= n_classes - 1``, else PCA when it reduces the
    dimension, else identity), 'pca', 'lda', 'identity', 'random', or an array of shape
    ``(n_components, n_features)``.
    """
    n_samples, n_features = X.shape
    if isinstance(init, np.ndarray) or (not isinstance(init, str) and init is not None):
        L = np.asarray(init, dtype=np.float64)
        if L.ndim != 2 or L.shape[1] != n_features or L.shape[0] != n_components:
            raise ValueError(f"init array must have shape ({n_components}, {n_features}), got {L.shape}")
        if not np.isfinite(L).all():
            raise ValueError("init array contains NaN or infinity")
        return L.copy()
    if init == "auto":
        n_classes = len(np.unique(y)) if y is not None else np.inf
        if y is not None and n_components <= min(n_features, n_classes - 1):
            init = "lda"
        elif n_components < min(n_features, n_samples):
            init = "pca"
        else:
            init = "identity"
    if init == "identity":
        return np.eye(n_components, n_features)
    if init == "random":
        return check_random_state(random_state).standard_normal((n_components, n_features))
    if init == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=min(n_components, n_samples), random_state=random_state).fit(X)
        L = np.zeros((n_components, n_features))
        L[: pca.components_.shape[0]] = pca.components_
        return L
    if init == "lda":
        if y is None:
            raise ValueError("init='lda' needs class labels")
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

        lda = LinearDiscriminantAnalysis(n_components=n_components).fit(X, y)
        return lda.scalings_.T[:n_components].copy()
    raise ValueError(
        f"init must be 'auto', 'pca', 'lda', 'identity', 'random' or an array, got {init!r}"
    )


def range_basis(X: np.ndarray, rtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Mean and an orthonormal basis (n_features × r) of the span of the centred data.

    Constant or collinear features carry no information about distances between the training
    samples; the closed-form learners solve their eigenproblems inside this span, which is what
    makes rank-deficient data (digits' constant border pixels) work without a singular matrix.
    """
    mean = X.mean(0)
    Xc = X - mean
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    rank = int((s > rtol * max(s[0], 1e-300) * np.sqrt(len(X))).sum()) if len(s) else 0
    if rank == 0:
        raise ValueError("every feature is constant: there is no distance to learn")
    return mean, Vt[:rank].T


def whitened_generalized_eigh(A: np.ndarray, B: np.ndarray, regularization: float):
    """Solve ``A v = λ B v`` with ``B`` ridge-regularised (``B + r·tr(B)/d·I``); ``Vᵀ B V = I``.

    Returns eigenvalues (descending) and eigenvectors as columns.
    """
    from scipy.linalg import eigh

    d = B.shape[0]
    ridge = regularization * max(np.trace(B), 1e-300) / d
    vals, vecs = eigh((A + A.T) / 2, (B + B.T) / 2 + ridge * np.eye(d))
    return vals[::-1], vecs[:, ::-1]
