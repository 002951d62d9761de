"""The pair-classifier side of pair learners (ITML, MMC): learn from and classify (x, x') pairs.

A pair is similar (+1) when its learned distance is at most ``threshold_``. ``fit(X, y)`` samples
pairs from class labels; ``fit_pairs(pairs, labels)`` learns from explicit pairs.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.utils.validation import check_is_fitted

from metrix.classical._base import threads_for, check_pairs, encode_classes
from metrix.classical._constraints import pair_indices_from_labels


def check_pair_labels(labels, n_pairs: int) -> np.ndarray:
    labels = np.asarray(labels).ravel()
    if labels.shape[0] != n_pairs:
        raise ValueError(f"{n_pairs} pairs but {labels.shape[0]} pair labels")
    values = set(np.unique(labels).tolist())
    if not values <= {-1, 1}:
        raise ValueError(f"pair labels must be +1 (similar) or -1 (dissimilar), got values {sorted(values)}")
    return labels.astype(np.int64)


def best_threshold(distances: np.ndarray, labels: np.ndarray, strategy: str = "accuracy",
                   max_fpr: float | None = None) -> float:
    """Distance threshold for "similar if distance <= threshold".

    ``strategy='accuracy'`` maximises pair accuracy; ``'fpr'`` takes the largest threshold whose
    false-accept rate (dissimilar pairs accepted) is at most ``max_fpr``.
    """
    order = np.argsort(distances, kind="stable")
    d, lab = distances[order], labels[order]
    # accepting the first i pairs (i = 0..n): thresholds between consecutive distinct distances
    tp = np.concatenate([[0], np.cumsum(lab == 1)])
    fp = np.concatenate([[0], np.cumsum(lab == -1)])
    n_neg = fp[-1]
    cut = np.concatenate([[True], d[1:] != d[:-1], [True]])  # only cut between different distances
    bounds = np.concatenate([[d[0] - 1.0], (d[:-1] + d[1:]) / 2, [d[-1] + 1.0]])
    if strategy == "accuracy":
        score = np.where(cut, tp + (n_neg - fp), -1)
        i = int(np.argmax(score))
    elif strategy == "fpr":
        if max_fpr is None or not 0.0 <= max_fpr <= 1.0:
            raise ValueError("strategy='fpr' needs max_fpr in [0, 1]")
        ok = np.flatnonzero(cut & (fp <= max_fpr * max(n_neg, 1)))
        i = int(ok[-1])
    else:
        raise ValueError(f"strategy must be 'accuracy' or 'fpr', got {strategy!r}")
    return float(bounds[i])


class PairClassifierMixin:
    """Adds ``fit_pairs``, ``decision_function``, ``predict``, ``calibrate_threshold`` and ``score``.

    Subclasses implement ``_learn_pairs(differences, labels, points)`` returning ``L`` and give
    ``n_constraints`` (pairs of each kind drawn by ``fit(X, y)``; default ``max(20·c², 2000)``:
    the paper's 20·c², but at least 2,000 because the batch solvers make constraints cheap and
    more of them lower the variance of the learned metric).
    """

    def _learn(self, X, y):
        classes, codes = encode_classes(y)
        n = self.n_constraints if self.n_constraints is not None else max(20 * len(classes) ** 2, 2000)
        idx, labels = pair_indices_from_labels(codes, int(n), random_state=self.random_state)
        diffs = X[idx[:, 0]] - X[idx[:, 1]]
        L = self._learn_pairs(diffs, labels, X)
        self._calibrate_from_differences(L, diffs, labels)
        return L

    def fit_pairs(self, pairs, labels):
        """Learn from explicit pairs, shape ``(n_pairs, 2, n_features)``, labelled +1 / −1.

        Returns
        -------
        self
        """
        pairs = check_pairs(pairs)
        labels = check_pair_labels(labels, len(pairs))
        if len(np.unique(labels)) < 2:
            raise ValueError("fit_pairs needs both similar (+1) and dissimilar (-1) pairs")
        self.n_features_in_ = pairs.shape[2]
        self.__dict__.pop("feature_names_in_", None)
        diffs = pairs[:, 0] - pairs[:, 1]
        with threads_for(len(pairs)):
            L = self._learn_pairs(diffs, labels, pairs.reshape(-1, pairs.shape[2]))
        self.components_ = np.ascontiguousarray(L, dtype=np.float64)
        self._calibrate_from_differences(self.components_, diffs, labels)
        return self

    def _calibrate_from_differences(self, L, diffs, labels):
        Z = diffs @ L.T
        self.threshold_ = best_threshold(np.sqrt((Z * Z).sum(1)), labels)

    def decision_function(self, pairs) -> np.ndarray:
        """Similarity score of each pair: minus its learned distance (higher = more similar)."""
        return -self.pair_distance(pairs)

    def predict(self, pairs) -> np.ndarray:
        """+1 (similar) where the learned distance is at most ``threshold_``, else −1."""
        check_is_fitted(self, "threshold_")
        return np.where(self.pair_distance(pairs) <= self.threshold_, 1, -1)

    def calibrate_threshold(self, pairs, labels, strategy: str = "accuracy", max_fpr: float | None = None):
        """Set ``threshold_`` on validation pairs: best accuracy, or a false-accept rate ≤ ``max_fpr``."""
        labels = check_pair_labels(labels, len(np.asarray(pairs)))
        self.threshold_ = best_threshold(self.pair_distance(pairs), labels, strategy, max_fpr)
        return self

    def score(self, pairs, labels) -> float:
        """ROC AUC of ``decision_function`` on labelled pairs."""
        labels = check_pair_labels(labels, len(np.asarray(pairs)))
        if len(np.unique(labels)) < 2:
            raise ValueError("ROC AUC needs both similar and dissimilar pairs")
        return float(roc_auc_score(labels, self.decision_function(pairs)))
