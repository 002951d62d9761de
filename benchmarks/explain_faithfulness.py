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
    mean_curves = {"ig_deletion": 0.0, "random_deletion": 0.0, "ig_insertion": 0.0, "random_insertion": 0.0}
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
        mean_curves["ig_deletion"] = mean_curves["ig_deletion"] + dele / len(queries)
        mean_curves["ig_insertion"] = mean_curves["ig_insertion"] + ins / len(queries)
        rd, ri = [], []
        for _ in range(5):
            dr, ir = curves(model, x, y, rng.permutation(order.size))
            rd.append(area(dr))
            ri.append(area(ir))
            mean_curves["random_deletion"] = mean_curves["random_deletion"] + dr / (5 * len(queries))
            mean_curves["random_insertion"] = mean_curves["random_insertion"] + ir / (5 * len(queries))
        out["random_deletion"].append(float(np.mean(rd)))
        out["random_insertion"].append(float(np.mean(ri)))
    summary = {k: float(np.mean(v)) for k, v in out.items()}
    summary["pairs"], summary["seconds"] = len(queries), time.perf_counter() - start
    summary["curves"] = mean_curves
    print(f"{name:<14} pairs {len(queries):>3}   deletion AUC  IG {summary['ig_deletion']:.3f}  random "
          f"{summary['random_deletion']:.3f}   insertion AUC  IG {summary['ig_insertion']:.3f}  random "
          f"{summary['random_insertion']:.3f}   mean completeness error {100 * summary['completeness']:.2f}%", flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--figure", type=Path, default=None, help="write the mean curves here (PNG, needs matplotlib)")
    parser.add_argument("--orl-size", type=int, nargs=2, default=[112, 92], metavar=("H", "W"),
                        help="ORL image size (default the originals' 112×92; at 56×46 deleting 5%% of the pixels to "
                             "black already drives the similarity to the black image's: see RESULTS.md)")
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
                                          samples_per_class=4, image_size=list(args.orl_size)))}
    results = {}
    for name, (data, kw) in settings.items():
        result = train(TrainConfig.from_sources(None, data=data, out=str(work / name.replace(" ", "-")), progress=False,
                                                checkpoint_every=0, **kw), echo=lambda *a: None)
        run = Run.open(result["run_dir"])
        ds = load_dataset(data, image_size=None if "image_size" not in kw else tuple(kw["image_size"]))
        test, gallery = stratified_split(ds.y, 0.5, seed=1)
        results[name] = evaluate(name, run, ds.X[test], ds.X[gallery], args.pairs)
    if args.figure is not None:
        figure(results, args.figure)


def figure(results: dict, path: Path) -> None:
    """Mean deletion and insertion curves per dataset: the gradients' order against random orders."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        c = r["curves"]
        ax.plot(FRACTIONS, c["ig_deletion"], "C3-", label=f"deletion, IG (AUC {r['ig_deletion']:.2f})")
        ax.plot(FRACTIONS, c["random_deletion"], "C3--", label=f"deletion, random ({r['random_deletion']:.2f})")
        ax.plot(FRACTIONS, c["ig_insertion"], "C0-", label=f"insertion, IG ({r['ig_insertion']:.2f})")
        ax.plot(FRACTIONS, c["random_insertion"], "C0--", label=f"insertion, random ({r['random_insertion']:.2f})")
        ax.set_title(f"{name}: {r['pairs']} pairs", fontsize=9)
        ax.set_xlabel("fraction of the query's pixels deleted / inserted", fontsize=8)
        ax.set_ylabel("similarity (0: black image, 1: the query)", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
