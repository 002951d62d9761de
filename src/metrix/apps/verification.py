"""Face-style verification (1:1) and identification (1:N) with an enrolled gallery.

FaceNet-style deployment: a trained embedding is fixed; people are *enrolled* by storing the
embeddings of a few of their samples, and a probe is compared by distance against a calibrated
threshold. New people need no retraining.

Distances are Euclidean (or cosine) between embeddings; "same" means distance ≤ threshold.
"""

from __future__ import annotations

import json
import math
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from metrix.distances import check_metric, pairwise_distance
from metrix.index import VectorIndex
from metrix.io import CorruptFileError, check_provenance, reading

GALLERY_TAG = "metrix_gallery"
GALLERY_METRICS = ("euclidean", "cosine")  # of metrix.distances.METRICS; the gallery's index uses it unchanged

FAR_TARGETS = (1e-1, 1e-2, 1e-3)


def _as_1d(a, name, dtype=np.float64):
    a = np.asarray(a, dtype=dtype).ravel()
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


def _check_scores(distances, same):
    d = _as_1d(distances, "distances")
    s = np.asarray(same).ravel()
    if s.shape != d.shape:
        raise ValueError(f"{d.size} distances but {s.size} same/different flags")
    if not np.isfinite(d).all():
        raise ValueError("distances contain NaN or infinity")
    s = s.astype(bool)
    if s.all() or not s.any():
        raise ValueError("verification metrics need both genuine (same) and impostor (different) pairs")
    return d, s


def roc_curve(distances, same):
    """False-accept rate, true-accept rate and thresholds, accepting ``distance <= threshold``.

    Returns arrays ``far, tar, thresholds`` starting at (0, 0) (threshold below every distance).
    """
    d, s = _check_scores(distances, same)
    order = np.argsort(d, kind="stable")
    d, s = d[order], s[order]
    last = np.concatenate([d[1:] != d[:-1], [True]])  # cut only between distinct distances
    tar = np.concatenate([[0.0], np.cumsum(s)[last] / s.sum()])
    far = np.concatenate([[0.0], np.cumsum(~s)[last] / (~s).sum()])
    thresholds = np.concatenate([[d[0] - 1.0], d[last]])
    return far, tar, thresholds


def verification_metrics(distances, same) -> dict:
    """ROC AUC, equal error rate and TAR at FAR ∈ {1e-1, 1e-2, 1e-3} of distance-scored pairs.

    TAR@FAR is the true-accept rate at the largest threshold whose false-accept rate is at most
    FAR; ``num_impostor_pairs`` says whether the small FARs are resolved (1e-3 needs ≥ 1,000).
    """
    far, tar, thr = roc_curve(distances, same)
    auc = float(np.trapezoid(np.concatenate([tar, [1.0]]), np.concatenate([far, [1.0]])))
    frr = 1.0 - tar
    i = int(np.argmin(np.abs(far - frr)))
    out = {
        "roc_auc": auc,
        "eer": float((far[i] + frr[i]) / 2),
        "eer_threshold": float(thr[i]),
        "num_genuine_pairs": int(np.asarray(same).astype(bool).sum()),
        "num_impostor_pairs": int((~np.asarray(same).astype(bool)).sum()),
    }
    for target in FAR_TARGETS:
        ok = np.flatnonzero(far <= target + 1e-15)
        out[f"tar_at_far_{target:g}"] = float(tar[ok[-1]])
    return out


def calibrate_threshold(distances, same, target_far: float | None = None) -> float:
    """Distance threshold: best pair accuracy, or the largest one with false-accept rate ≤ ``target_far``."""
    far, tar, thr = roc_curve(distances, same)
    s = np.asarray(same).astype(bool).ravel()
    if target_far is None:
        accuracy = (tar * s.sum() + (1 - far) * (~s).sum()) / s.size
        i = int(np.argmax(accuracy))
    else:
        if not 0.0 <= target_far <= 1.0:
            raise ValueError(f"target_far must be in [0, 1], got {target_far}")
        i = int(np.flatnonzero(far <= target_far + 1e-15)[-1])
    return float(thr[i])


def plot_roc(curves: dict, path, title: str = "ROC") -> Path:
    """Save ROC curves ``{name: (far, tar)}`` on a log-FAR axis (needs the ``plots`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plot_roc needs matplotlib: pip install 'metrix[plots]'") from exc
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (far, tar) in curves.items():
        ax.plot(np.maximum(far, 1e-4), tar, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class Gallery:
    """Enrolled identities for 1:1 verification and 1:N open-set identification.

    Parameters
    ----------
    threshold : float or None
        Accept distance (``distance <= threshold`` means "same person"). Needed by ``verify``
        and for "unknown" answers in ``identify``; set it with :func:`calibrate_threshold`.
    metric : 'euclidean' or 'cosine'
    match : 'nearest' (distance to the closest enrolled sample) or 'mean' (to the mean of the
        identity's samples, a prototype).

    Example
    -------
    >>> g = Gallery(threshold=0.5)
    >>> g.enroll("ada", [[0.0, 1.0], [0.1, 0.9]])  # samples added
    2
    >>> g.identify([[0.0, 0.95]], k=1)[0]["identity"]
    'ada'
    """

    def __init__(self, threshold: float | None = None, metric: str = "euclidean", match: str = "nearest"):
        check_metric(metric, GALLERY_METRICS, "a gallery")
        if match not in ("nearest", "mean"):
            raise ValueError(f"match must be 'nearest' or 'mean', got {match!r}")
        self.threshold = threshold
        self.metric = metric
        self.match = match
        self.provenance: dict[str, str] = {}  # what made the embeddings (e.g. {"run": fingerprint})
        self._index: VectorIndex | None = None  # every enrolled sample, metadata {"identity": name}; made at the first enrolment
        self._ids_of: dict[str, list[int]] = {}  # identity -> its samples' ids in the index, in enrolment order
        self._owner: dict[int, str] = {}  # sample id -> identity
        self._lock = threading.RLock()

    # -- enrolment -------------------------------------------------------------------------
    def _check(self, x, name="samples") -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (n, dim) array of embeddings, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contain NaN or infinity")
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"{name} have dimension {x.shape[1]}, the gallery holds dimension {self.dim}")
        return x

    @property
    def dim(self) -> int | None:
        return None if self._index is None else self._index.dim

    @property
    def identities(self) -> list[str]:
        return list(self._ids_of)

    def __len__(self) -> int:
        return len(self._ids_of)

    def samples(self, identity: str) -> np.ndarray:
        """The embeddings enrolled for ``identity`` (a copy), in enrolment order."""
        with self._lock:
            if str(identity) not in self._ids_of:
                raise KeyError(f"identity {identity!r} is not enrolled")
            return self._index.get(self._ids_of[str(identity)])

    def unseen(self, identity: str, samples) -> np.ndarray:
        """The rows of ``samples`` that :meth:`enroll` would add to ``identity``: each distinct row once, in
        order, without those the identity already holds."""
        identity = str(identity)
        with self._lock:
            x = self._check(samples)
            _, first = np.unique(x, axis=0, return_index=True)
            x = x[np.sort(first)]
            if identity in self._ids_of:
                seen = {row.tobytes() for row in self.samples(identity)}
                x = x[[row.tobytes() not in seen for row in x]]
            return x

    def enroll(self, identity: str, samples, replace: bool = False) -> int:
        """Add embeddings of ``identity`` (appended to earlier ones unless ``replace``). A sample identical to
        one the identity already holds (or repeated in ``samples``) is skipped, so enrolling the same images
        twice does not weigh them double. Returns the number of samples added."""
        identity = str(identity)
        with self._lock:
            if replace and identity in self._ids_of:
                self._check(samples)  # bad samples fail before the identity is removed
                self.remove(identity)
            x = self.unseen(identity, samples)
            if len(x):
                if self._index is None:
                    self._index = VectorIndex(x.shape[1], metric=self.metric)
                ids = self._index.add(x, metadata=[{"identity": identity}] * len(x), check_input=False)  # _check did
                self._ids_of.setdefault(identity, []).extend(int(i) for i in ids)
                self._owner.update((int(i), identity) for i in ids)
            return len(x)

    def remove(self, identity: str) -> None:
        with self._lock:
            if str(identity) not in self._ids_of:
                raise KeyError(f"identity {identity!r} is not enrolled")
            ids = self._ids_of.pop(str(identity))
            self._index.remove(ids)
            for i in ids:
                del self._owner[i]

    # -- comparison ------------------------------------------------------------------------
    def distance_matrix(self, x) -> tuple[np.ndarray, list[str]]:
        """Probe × identity distances under the gallery's metric and match rule, and the identity order."""
        with self._lock:
            return self._distances(self._check(x, "probes"))

    def _distances(self, x: np.ndarray, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
        """Probe × identity distances for ``names`` (default every identity)."""
        if not self._ids_of:
            raise ValueError("the gallery is empty: enroll identities first")
        names = list(self._ids_of) if names is None else names
        q = torch.from_numpy(x)
        if self.match == "mean":
            refs = torch.from_numpy(np.stack([self.samples(n).mean(0) for n in names]))
            return self.pairwise_distances(q, refs).numpy(), names
        ids = [i for n in names for i in self._ids_of[n]]
        refs = torch.from_numpy(self._index.get(ids))
        owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([len(self._ids_of[n]) for n in names]))
        D = self.pairwise_distances(q, refs)
        out = torch.full((len(q), len(names)), float("inf"))
        out.scatter_reduce_(1, owner.expand(len(q), -1), D, reduce="amin")
        return out.numpy(), names

    def pairwise_distances(self, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Distances between the rows of two embedding tensors under the gallery's metric."""
        return pairwise_distance(q, r, self.metric)

    def _nearest_identities(self, x: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The ``k`` closest identities of each probe by their closest sample, from one index search: the
        ``k × (most samples of one identity)`` nearest samples always hold ``k`` distinct identities."""
        most = max(len(v) for v in self._ids_of.values())
        dist, ids = self._index.search(x, min(len(self._owner), k * most), check_input=False)  # probes checked
        out = []
        for drow, irow in zip(dist, ids):
            best: dict[str, float] = {}
            for d, i in zip(drow.tolist(), irow.tolist()):
                name = self._owner[i]
                if name not in best:
                    best[name] = d
                    if len(best) == k:
                        break
            out.append(list(best.items()))
        return out

    def distance(self, x, identity: str) -> np.ndarray:
        """Distance of each probe to ``identity``."""
        with self._lock:
            x = self._check(x, "probes")
            if str(identity) not in self._ids_of:
                raise KeyError(f"identity {identity!r} is not enrolled")
            D, _ = self._distances(x, [str(identity)])
            return D[:, 0]

    def verify(self, x, identity: str) -> tuple[np.ndarray, np.ndarray]:
        """1:1 — is each probe ``identity``? Returns ``(accepted, distances)``."""
        if self.threshold is None:
            raise ValueError("the gallery has no threshold yet: run 'metrix gallery calibrate' (in Python: Gallery(threshold=...) or calibrate_threshold)")
        d = self.distance(x, identity)
        return d <= self.threshold, d

    def identify(self, x, k: int = 1) -> list[dict]:
        """1:N — the ``k`` closest identities of each probe; ``identity`` is None ("unknown") when
        the best distance is beyond the threshold (open set). Without a threshold every probe is given its
        nearest identity (closed set), which a warning says."""
        if self.threshold is None:
            warnings.warn("the gallery has no threshold, so identify never answers 'unknown': every probe gets its "
                          "nearest identity; set one with 'metrix gallery calibrate' (or Gallery.threshold)",
                          UserWarning, stacklevel=2)
        if int(k) < 1:
            raise ValueError("k must be >= 1")
        with self._lock:
            x = self._check(x, "probes")
            if not self._ids_of:
                raise ValueError("the gallery is empty: enroll identities first")
            k = min(int(k), len(self._ids_of))
            if self.match == "nearest":
                ranked = self._nearest_identities(x, k)
            else:
                D, names = self._distances(x)
                top = np.argsort(D, axis=1, kind="stable")[:, :k]
                ranked = [[(names[j], float(row[j])) for j in idx] for row, idx in zip(D, top)]
        results = []
        for candidates in ranked:
            known = self.threshold is None or candidates[0][1] <= self.threshold
            results.append({
                "identity": candidates[0][0] if known else None,
                "candidates": [{"identity": name, "distance": float(d)} for name, d in candidates],
            })
        return results

    # -- persistence -----------------------------------------------------------------------
    def save(self, path, key: bytes | str | None = None) -> Path:
        """One file, atomic and checksummed: the gallery's vector index (every sample, with its identity as
        metadata) and the gallery's settings in the same header; with ``key`` signed (HMAC-SHA256), and
        :meth:`load` then needs the same key."""
        with self._lock:
            info = {"identities": list(self._ids_of), "threshold": self.threshold, "metric": self.metric,
                    "match": self.match, "provenance": self.provenance, "empty": self._index is None}
            index = self._index if self._index is not None else VectorIndex(1, metric=self.metric)
            return index.save(path, key=key, header={GALLERY_TAG: json.dumps(info)})

    @classmethod
    def load(cls, path, key: bytes | str | None = None) -> "Gallery":
        index, header = VectorIndex.load_with_header(path, key=key)
        if GALLERY_TAG not in header:
            raise CorruptFileError(f"{path} is not a metrix gallery file")
        with reading(path, "gallery file"):
            info = json.loads(header[GALLERY_TAG])
            names, threshold = info["identities"], info["threshold"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
                raise CorruptFileError(f"{path}: the identities must be distinct names")
            if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                          or not math.isfinite(threshold)):
                raise CorruptFileError(f"{path}: invalid threshold {threshold!r}")
            gallery = cls(threshold, info["metric"], info["match"])
            gallery.provenance = check_provenance(info.get("provenance", {}), path)
            if index.metric != gallery.metric:
                raise CorruptFileError(f"{path}: the index compares with {index.metric!r}, the gallery with {gallery.metric!r}")
            owners = {int(i): (index.metadata(int(i)) or {}).get("identity") for i in index.ids}
            if info.get("empty") is True:
                owners = {}
            elif set(owners.values()) != set(names):
                raise CorruptFileError(f"{path}: the stored embeddings do not match the {len(names)} identities")
            if owners:
                gallery._index = index
            gallery._ids_of = {name: [] for name in names}
            for i, name in owners.items():
                gallery._ids_of[name].append(i)
                gallery._owner[i] = name
        return gallery
