"""Out-of-distribution and anomaly detection in a learned embedding space.

Two detectors, both "higher score = more anomalous":

- :class:`MahalanobisDetector` (Lee et al., NeurIPS 2018): class-conditional Gaussians with one
  shared covariance fitted on in-distribution embeddings; score = smallest squared Mahalanobis
  distance to a class mean. The covariance is shrunk (Ledoit–Wolf by default), so it works
  when the embedding dimension is large next to the number of samples.
- :class:`KNNDetector` (Sun et al., ICML 2022): distance to the k-th nearest training embedding.

:func:`ood_metrics` gives AUROC and the false-positive rate at 95% true-positive rate, with the
in-distribution samples as positives (the convention of Hendrycks & Gimpel and later papers).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import ledoit_wolf
from sklearn.metrics import roc_auc_score


def _check_embeddings(x, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, dim) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinity")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]}, the detector was fitted on dimension {dim}")
    return x


class _ThresholdMixin:
    def calibrate(self, in_distribution, tpr: float = 0.95):
        """Set ``threshold_`` so that a fraction ``tpr`` of these in-distribution samples is accepted."""
        if not 0.0 < tpr <= 1.0:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        self.threshold_ = float(np.quantile(self.score(in_distribution), tpr))
        return self

    def predict(self, x) -> np.ndarray:
        """True where a sample is flagged as out-of-distribution (score above ``threshold_``)."""
        if not hasattr(self, "threshold_"):
            raise ValueError("call calibrate(in_distribution_samples) first to choose the threshold")
        return self.score(x) > self.threshold_


class MahalanobisDetector(_ThresholdMixin):
    """Minimum class-conditional Mahalanobis distance with a shared, shrunk covariance.

    Parameters
    ----------
    shrinkage : 'auto' (Ledoit–Wolf) or float in [0, 1]

    Example
    -------
    >>> rng = np.random.default_rng(0)
    >>> det = MahalanobisDetector().fit(rng.normal(size=(200, 4)), np.arange(200) % 2)
    >>> bool(det.score([[8.0, 8, 8, 8]])[0] > det.score([[0.0, 0, 0, 0]])[0])
    True
    """

    def __init__(self, shrinkage="auto"):
        self.shrinkage = shrinkage

    def fit(self, embeddings, labels):
        x = _check_embeddings(embeddings, "embeddings")
        labels = np.asarray(labels).ravel()
        if labels.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} embeddings but {labels.shape[0]} labels")
        classes, codes = np.unique(labels, return_inverse=True)
        counts = np.bincount(codes)
        means = np.zeros((len(classes), x.shape[1]))
        np.add.at(means, codes, x)
        means /= counts[:, None]
        centred = x - means[codes]
        if len(x) - len(classes) < 1:
            raise ValueError("every class has one sample: the within-class covariance cannot be estimated")
        if self.shrinkage == "auto":
            cov = ledoit_wolf(centred, assume_centered=True)[0]
        else:
            s = float(self.shrinkage)
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"shrinkage must be 'auto' or in [0, 1], got {self.shrinkage!r}")
            cov = centred.T @ centred / len(x)
            cov = (1 - s) * cov + s * np.trace(cov) / x.shape[1] * np.eye(x.shape[1])
        vals, vecs = np.linalg.eigh(cov)
        if vals.min() <= vals.max() * 1e-12:
            raise ValueError("the within-class covariance is singular: use shrinkage='auto' or a positive shrinkage")
        self.whitening_ = vecs / np.sqrt(vals)  # z = x W  ⇒  ||z − z'||² = Mahalanobis²
        self.classes_ = classes
        self.means_ = means
        self._whitened_means = torch.from_numpy(means @ self.whitening_)
        return self

    def score(self, x) -> np.ndarray:
        """Smallest squared Mahalanobis distance to a class mean (higher = more anomalous)."""
        if not hasattr(self, "whitening_"):
            raise ValueError("fit the detector first")
        z = torch.from_numpy(_check_embeddings(x, "x", self.means_.shape[1]) @ self.whitening_)
        return (torch.cdist(z, self._whitened_means) ** 2).amin(1).numpy()


class KNNDetector(_ThresholdMixin):
    """Distance to the k-th nearest training embedding (higher = more anomalous).

    Parameters
    ----------
    k : int
        Which neighbour (Sun et al. use 1–50; default 10).
    normalize : bool
        L2-normalise embeddings first (Sun et al.'s recommendation for deep features).
    metric : str
        How neighbours are compared: a name of :data:`metrix.neighbors.KNN_METRICS` other than ``dot`` (the
        score is a distance); default ``euclidean``.
    """

    def __init__(self, k: int = 10, normalize: bool = True, metric: str = "euclidean"):
        self.k = k
        self.normalize = normalize
        self.metric = metric

    def _prep(self, x, name, dim=None):
        x = torch.from_numpy(_check_embeddings(x, name, dim).astype(np.float32))
        return torch.nn.functional.normalize(x, dim=1) if self.normalize else x

    def fit(self, embeddings, labels=None):
        if int(self.k) < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        from metrix.distances import check_metric
        from metrix.neighbors import KNN_METRICS

        check_metric(self.metric, [m for m in KNN_METRICS if m != "dot"], "KNNDetector (its score is a distance)")
        self.reference_ = self._prep(embeddings, "embeddings")
        if len(self.reference_) < self.k:
            raise ValueError(f"k={self.k} but only {len(self.reference_)} training embeddings")
        return self

    def score(self, x) -> np.ndarray:
        from metrix.neighbors import knn

        if not hasattr(self, "reference_"):
            raise ValueError("fit the detector first")
        q = self._prep(x, "x", self.reference_.shape[1])
        dist, _ = knn(q, self.reference_, int(self.k), metric=self.metric)
        return dist[:, -1].double().numpy()


def max_softmax_score(logits) -> np.ndarray:
    """Baseline of Hendrycks & Gimpel (ICLR 2017): minus the largest softmax probability."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return (-torch.softmax(logits, dim=1).amax(1)).numpy()


def ood_metrics(scores_in, scores_out) -> dict:
    """AUROC (OOD scored higher is better) and FPR at 95% TPR (in-distribution as positives)."""
    s_in = np.asarray(scores_in, dtype=np.float64).ravel()
    s_out = np.asarray(scores_out, dtype=np.float64).ravel()
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("need in-distribution and out-of-distribution scores")
    if not (np.isfinite(s_in).all() and np.isfinite(s_out).all()):
        raise ValueError("scores contain NaN or infinity")
    auroc = roc_auc_score(np.r_[np.zeros(s_in.size), np.ones(s_out.size)], np.r_[s_in, s_out])
    threshold = np.quantile(s_in, 0.95)  # 95% of in-distribution samples accepted (score ≤ threshold)
    return {"auroc": float(auroc), "fpr_at_95_tpr": float(np.mean(s_out <= threshold))}
