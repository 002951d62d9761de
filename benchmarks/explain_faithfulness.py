"""Are the similarity maps faithful? Deletion and insertion curves on real images (Petsiuk et al., 2018).

For pairs (query, its nearest gallery image) under a trained run, the query's integrated-gradients map ranks its
pixels by how much they make the pair alike. Deletion: set the top-ranked pixels to the baseline (0) a few
percent at a time and follow the similarity −d; a faithful map makes it fall faster than random orders do
(lower area under the curve). Insertion: start from the baseline image and put pixels back, top-ranked first;
the similarity should rise faster (higher area). Areas are of the similarity rescaled to 0 at the baseline
image and 1 at the query itself.

    METRIX_DATA=../shared/data python benchmarks/explain_faithfulness.py [--pairs 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from metrix.datasets import load_dataset, stratified_split
from metrix.explain import integrated_gradients
from metrix.jobs.train import TrainConfig, train
from metrix.neighbors import knn
from metrix.runs import Run

FRACTIONS = np.linspace(0.0, 1.0, 21)


def curves(model, x: torch.Tensor, y: torch.Tensor, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Similarity (rescaled) after deleting / inserting the first f of ``order``, for each f of FRACTIONS."""
    flat = x.reshape(-1)
    n = flat.numel()
    deleted, inserted = [], []
    for f in FRACTIONS:
        idx = torch.from_numpy(order[: int(round(f * n))])
        d_img, i_img = flat.clone(), torch.zeros_like(flat)
        d_img[idx], i_img[idx] = 0.0, flat[idx]
        deleted.append(d_img.reshape(x.shape))
        inserted.append(i_img.reshape(x.shape))
    with torch.no_grad():
        target = model(y[None])
        sims = [-torch.linalg.vector_norm(model(torch.stack(batch)) - target, dim=1).numpy() for batch in (deleted, inserted)]
        full = float(-torch.linalg.vector_norm(model(x[None]) - target))
        base = float(-torch.linalg.vector_norm(model(torch.zeros_like(x)[None]) - target))
    scale = full - base if abs(full - base) > 1e-9 else 1.0
    return (sims[0] - base) / scale, (sims[1] - base) / scale


def area(curve: np.ndarray) -> float:
    return float(np.trapezoid(curve, FRACTIONS))


def evaluate(name: str, run: Run, X: np.ndarray, gallery: np.ndarray, pairs: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    queries = rng.choice(len(X), size=min(pairs, len(X)), replace=False)
    emb_g = run.embed(gallery)
    _, nearest = knn(run.embed(X[queries]), emb_g, k=1, metric=run.metric)
    model = run.model
    out = {"ig_deletion": [], "random_deletion": [], "ig_insertion": [], "random_insertion": [], "completeness": []}
    start = time.perf_counter()
    for q, g in zip(queries, nearest[:, 0].tolist()):
        x = run.input_spec.check(X[q][None])[0]
        y = run.input_spec.check(gallery[g][None])[0]
        att = integrated_gradients(model, x, y, run.metric, steps=64)
        out["completeness"].append(att.completeness_error / max(abs(att.similarity - att.baseline_similarity), 1e-12))
        order = np.argsort(-att.values.reshape(-1).numpy(), kind="stable")
        dele, ins = curves(model, x, y, order)
        out["ig_deletion"].append(area(dele))
        out["ig_insertion"].append(area(ins))
        rd, ri = [], []
        for _ in range(5):
            dr, ir = curves(model, x, y, rng.permutation(order.size))
            rd.append(area(dr))
            ri.append(area(ir))
        out["random_deletion"].append(float(np.mean(rd)))
        out["random_insertion"].append(float(np.mean(ri)))
    summary = {k: float(np.mean(v)) for k, v in out.items()}
    summary["pairs"], summary["seconds"] = len(queries), time.perf_counter() - start
    print(f"{name:<14} pairs {len(queries):>3}   deletion AUC  IG {summary['ig_deletion']:.3f}  random "
          f"{summary['random_deletion']:.3f}   insertion AUC  IG {summary['ig_insertion']:.3f}  random "
          f"{summary['random_insertion']:.3f}   mean completeness error {100 * summary['completeness']:.2f}%", flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=40)
    args = parser.parse_args()
    if not Path(os.environ.get("METRIX_DATA", "data"), "fashion_mnist").is_dir():
        raise SystemExit("set METRIX_DATA to a folder holding fashion_mnist/ and orl_faces/ (e.g. ../shared/data)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(f"explain faithfulness (commit {commit}): integrated gradients (64 steps, black baseline) vs random pixel orders")
    work = Path(tempfile.mkdtemp(prefix="metrix-explain-"))
    fm = load_dataset("fashion-mnist:train")
    keep, _ = stratified_split(fm.y, 0.9, seed=0)  # 6,000 images: a quick run
    np.savez(work / "fm.npz", X=fm.X[keep], y=fm.y[keep])
    settings = {"fashion-mnist": (str(work / "fm.npz"), dict(backbone="convnet", epochs=2, embedding_dim=64)),
                "orl faces": ("orl", dict(backbone="convnet", epochs=15, embedding_dim=64, classes_per_batch=10,
                                          samples_per_class=4, image_size=[56, 46]))}
    for name, (data, kw) in settings.items():
        result = train(TrainConfig.from_sources(None, data=data, out=str(work / name.replace(" ", "-")), progress=False,
                                                checkpoint_every=0, **kw), echo=lambda *a: None)
        run = Run.open(result["run_dir"])
        ds = load_dataset(data, image_size=None if "image_size" not in kw else tuple(kw["image_size"]))
        test, gallery = stratified_split(ds.y, 0.5, seed=1)
        evaluate(name, run, ds.X[test], ds.X[gallery], args.pairs)


if __name__ == "__main__":
    main()
