"""The ``metrix fit-linear`` / ``metrix transform-linear`` jobs: fit a classical learner on a dataset.

The standardisation learned on the train split is folded into the saved ``components_``
(``L' = L·diag(1/σ)``), so a saved learner works on raw features: distances are exactly those
of the standardised pipeline (the mean shift cancels in every difference).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from metrix.classical import ESTIMATORS
from metrix.classical.persistence import load_estimator, save_estimator
from metrix.datasets import encode_labels, load_dataset, stratified_split
from metrix.io import atomic_write_bytes
from metrix.runs import MODEL_FILE, model_file, new_run_dir


def parse_params(items: list[str] | None, flag: str = "--param") -> dict:
    """``["k=7", "init=pca"]`` → ``{"k": 7, "init": "pca"}`` (values parsed as YAML scalars)."""
    params = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag} expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip()] = yaml.safe_load(value)
    return params


def _knn_accuracy(Z_train, y_train, Z_test, y_test, k: int) -> float:
    return float(KNeighborsClassifier(k).fit(Z_train, y_train).score(Z_test, y_test))


def fit_linear(algorithm: str, data: str = "digits", out: str | Path | None = None, n_components: int | None = None,
               params: dict | None = None, seed: int = 0, k: int = 3, label_column: str = "label",
               echo=print) -> dict:
    """Fit ``algorithm`` on a stratified 70/30 split of ``data``; report k-NN accuracy before/after; save."""
    names = {name.lower(): name for name in ESTIMATORS}
    if algorithm.lower() not in names:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ESTIMATORS)}")
    cls = ESTIMATORS[names[algorithm.lower()]]
    ds = load_dataset(data, label_column)
    X = ds.X.reshape(len(ds.X), -1).astype(np.float64)
    y, classes = encode_labels(ds.y)
    train, test = stratified_split(y, 0.3, seed)
    scaler = StandardScaler().fit(X[train])
    X_tr, X_te = scaler.transform(X[train]), scaler.transform(X[test])
    kwargs = dict(params or {})
    if n_components is not None:
        kwargs["n_components"] = n_components
    valid = cls().get_params()
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"{cls.__name__} has no parameter {', '.join(map(repr, unknown))}; "
                         f"its parameters are: {', '.join(sorted(valid))}")
    if "random_state" in valid:
        kwargs.setdefault("random_state", seed)
    estimator = cls(**kwargs)
    run_dir = new_run_dir(out, f"{ds.name}-{cls.__name__.lower()}")  # before fitting: a used --out is refused at once
    target = y[train].astype(np.float64) if cls is ESTIMATORS["MLKR"] else y[train]
    start = time.perf_counter()
    estimator.fit(X_tr, target)
    seconds = time.perf_counter() - start
    result = {
        "algorithm": cls.__name__, "data": data, "n_train": int(len(train)), "n_test": int(len(test)),
        "n_features": int(X.shape[1]), "n_components": int(estimator.components_.shape[0]),
        "knn_k": k, "fit_seconds": seconds,
        "knn_accuracy_before": _knn_accuracy(X_tr, y[train], X_te, y[test], k),
        "knn_accuracy_after": _knn_accuracy(estimator.transform(X_tr), y[train], estimator.transform(X_te), y[test], k),
    }
    # fold the standardisation in: L(x − μ)/σ and (L/σ)x differ by a constant shift only
    estimator.components_ = estimator.components_ / scaler.scale_[None, :]
    out = run_dir / MODEL_FILE
    save_estimator(estimator, out, extra={**result, "classes": [str(c) for c in classes],
                                          "input": "raw features (standardisation folded into components)"})
    result["path"] = str(out)
    echo(f"{cls.__name__} on {data}: {len(train)} train / {len(test)} test samples, {X.shape[1]} -> "
         f"{result['n_components']} dimensions, fit in {seconds:.2f} s")
    echo(f"  {k}-NN test accuracy   standardised euclidean {result['knn_accuracy_before']:.4f}   "
         f"learned metric {result['knn_accuracy_after']:.4f}")
    echo(f"  saved {out.parent}/")
    return result


def transform_linear(model: str | Path, data: str, out: str | Path, label_column: str = "label") -> tuple[Path, int]:
    """Map a dataset with a saved learner (a run folder of ``metrix fit-linear``, or its model file); write
    ``.npz`` with ``embeddings`` and ``labels`` (atomically)."""
    estimator = load_estimator(model_file(model, "metrix fit-linear"))
    ds = load_dataset(data, label_column)
    X = ds.X.reshape(len(ds.X), -1).astype(np.float64)
    if X.shape[1] != estimator.n_features_in_:
        raise ValueError(f"{data} has {X.shape[1]} features, the model expects {estimator.n_features_in_}")
    Z = estimator.transform(X)
    out = Path(out)
    labels = np.asarray(ds.y)
    if labels.dtype == object:
        labels = labels.astype(str)
    buf = io.BytesIO()
    np.savez(buf, embeddings=Z.astype(np.float32), labels=labels)
    atomic_write_bytes(out, buf.getvalue())
    return out, Z.shape[1]
