"""What the ``metrix gallery`` commands do: embed inputs with a trained run, then use a Gallery."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from metrix.apps.verification import Gallery, calibrate_threshold
from metrix.datasets import load_inputs
from metrix.runs import Run, as_run


def _sphere_run(run) -> Run:
    return as_run(run).require_sphere("the gallery and OOD tools")


def _embed(run: Run, data: str, label_column: str = "label"):
    x, y = load_inputs(data, label_column)
    return run.embed(x, progress="embedding").numpy(), y


def _open(path, run: Run, create: bool = False, allow_other_run: bool = False, metric: str = "euclidean") -> Gallery:
    """The gallery at ``path`` (new and tied to the run when ``create``); one enrolled with another run
    is refused unless ``allow_other_run``."""
    path = Path(path)
    if path.exists():
        gallery = Gallery.load(path)
        run.check_built_here(gallery.provenance, "gallery", allow_other_run)
        return gallery
    if create:
        gallery = Gallery(metric=metric)
        gallery.provenance = {"run": run.fingerprint}
        return gallery
    raise FileNotFoundError(f"no gallery at {path}: create one with 'metrix gallery enroll'")


def enroll(gallery_path, run, data: str, identity: str | None = None, label_column: str = "label",
           allow_other_run: bool = False, metric: str | None = None) -> dict:
    """Enrol ``data``: every label as an identity, or all samples as ``identity``. Returns the samples
    added per identity (samples the identity already holds are not added twice). ``metric`` (one of
    :data:`metrix.apps.verification.GALLERY_METRICS`) is a new gallery's; an existing one keeps its own."""
    run = _sphere_run(run)
    gallery = _open(gallery_path, run, create=True, allow_other_run=allow_other_run, metric=metric or "euclidean")
    if metric is not None and gallery.metric != metric:
        raise ValueError(f"the gallery at {gallery_path} compares with {gallery.metric!r}, not {metric!r}: "
                         "leave out --metric, or enrol into a new gallery")
    emb, labels = _embed(run, data, label_column)
    counts: dict[str, int] = {}
    if identity is not None:
        counts[identity] = gallery.enroll(identity, emb)
    else:
        if labels is None:
            raise ValueError(f"{data} has no labels: give --identity to enrol all its samples as one person")
        for name in np.unique(labels):
            counts[str(name)] = gallery.enroll(str(name), emb[labels == name])
    gallery.save(gallery_path)
    return {"added": counts, "duplicates": int(len(emb) - sum(counts.values()))}


def calibrate(gallery_path, run, data: str, target_far: float | None, label_column: str = "label",
              max_samples: int = 3000, allow_other_run: bool = False) -> dict:
    """Set the gallery threshold from labelled data: all pairs of its samples (same label = genuine),
    from a seeded sample of ``max_samples`` when there are more."""
    run = _sphere_run(run)
    emb, labels = _embed(run, data, label_column)
    if labels is None:
        raise ValueError("calibration needs labelled data")
    gallery = _open(gallery_path, run, allow_other_run=allow_other_run)
    if len(emb) > max_samples:  # all pairs of 3,000 samples are 4.5 M distances: plenty, and bounded memory
        keep = np.random.default_rng(0).choice(len(emb), max_samples, replace=False)
        emb, labels = emb[keep], labels[keep]
    import torch

    x = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    a, b = np.triu_indices(len(emb), 1)
    d = gallery.pairwise_distances(x, x).numpy()[a, b]  # the metric the gallery will compare with
    same = labels[a] == labels[b]
    gallery.threshold = calibrate_threshold(d, same, target_far)
    gallery.save(gallery_path)
    return {"threshold": gallery.threshold, "far": float(np.mean(d[~same] <= gallery.threshold)),
            "tar": float(np.mean(d[same] <= gallery.threshold)), "pairs": int(len(d))}


def verify(gallery_path, run, data: str, identity: str, label_column: str = "label",
           allow_other_run: bool = False) -> list[dict]:
    run = _sphere_run(run)
    emb, _ = _embed(run, data, label_column)
    accepted, dist = _open(gallery_path, run, allow_other_run=allow_other_run).verify(emb, identity)
    return [{"sample": i, "accepted": bool(a), "distance": float(d)} for i, (a, d) in enumerate(zip(accepted, dist))]


def identify(gallery_path, run, data: str, k: int = 1, label_column: str = "label", limit: int | None = None,
             allow_other_run: bool = False) -> list[dict]:
    run = _sphere_run(run)
    emb, labels = _embed(run, data, label_column)
    if limit is not None:
        emb = emb[:limit]
    out = _open(gallery_path, run, allow_other_run=allow_other_run).identify(emb, k)
    for i, r in enumerate(out):
        r["sample"] = i
        if labels is not None:
            r["label"] = labels[i].item() if hasattr(labels[i], "item") else labels[i]
    return out


def ood_evaluate(run, fit_data: str, in_data: str, ood_data: str, detector: str = "mahalanobis", k: int = 10,
                 label_column: str = "label", metric: str = "euclidean") -> dict:
    """Fit a detector on the embeddings of ``fit_data`` and report AUROC / FPR@95TPR of
    ``in_data`` (in-distribution) against ``ood_data`` (the run is opened once for all three)."""
    from metrix.apps.ood import KNNDetector, MahalanobisDetector, ood_metrics

    run = _sphere_run(run)
    emb, labels = _embed(run, fit_data, label_column)
    if detector == "mahalanobis":
        if labels is None:
            raise ValueError("the Mahalanobis detector needs labelled fit data (class means)")
        det = MahalanobisDetector().fit(emb, labels)
    elif detector == "knn":
        det = KNNDetector(k=k, metric=metric).fit(emb)
    else:
        raise ValueError(f"detector must be 'mahalanobis' or 'knn', got {detector!r}")
    s_in = det.score(_embed(run, in_data, label_column)[0])
    s_out = det.score(_embed(run, ood_data, label_column)[0])
    return {"detector": detector, "num_in": int(len(s_in)), "num_ood": int(len(s_out)), **ood_metrics(s_in, s_out)}
