"""Retrieval evaluation and search at scale: metrix vs pytorch-metric-learning, and faiss ANN settings.

Data: N clustered vectors (default 200,000 × 128-d, 1,000 classes of 200, seeded), written once to a
temporary folder so every contender reads identical inputs.

* ``exact``: precision@1, R-precision and MAP@R with query = reference (self excluded), by
  ``metrix.evaluation.retrieval_metrics`` and by PML's ``AccuracyCalculator(k="max_bin_count")``
  (its default exact faiss ``IndexFlatL2`` kNN). Each runs in its own subprocess so its wall time and
  peak RSS (whole process) are its own; the metric values must agree to 1e-4. The GEMM floor is
  N²·D·2 flops at the measured matmul rate.
* ``ann``: recall@10 against exact search and queries/s for faiss HNSW, IVF and IVF-PQ settings,
  through ``metrix.index.VectorIndex``, on 10,000 held-out queries.

    python benchmarks/evaluation_at_scale.py              # both parts (about 10 minutes on 2 cores)
    python benchmarks/evaluation_at_scale.py --part ann --n 50000

Requires the ``faiss`` and ``test`` extras.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METRICS = ("precision_at_1", "r_precision", "map_at_r")


def make_data(folder: Path, n: int, dim: int, classes: int, n_queries: int, noise: float, seed: int = 0,
              latent: int = 0) -> None:
    """Gaussian classes. ``latent=0``: isotropic noise in all ``dim`` directions (full intrinsic dimension,
    the hardest case for ANN). ``latent=m``: within-class variation lies in a shared random m-dimensional
    subspace plus 10 % isotropic noise, closer to learned embeddings, which sit near low-dimensional manifolds."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = np.repeat(np.arange(classes), n // classes)
    rng.shuffle(labels)
    q_labels = rng.integers(0, classes, n_queries)

    def spread(count):
        if not latent:
            return noise * rng.normal(size=(count, dim))
        basis = np.linalg.qr(np.random.default_rng(seed + 1).normal(size=(dim, latent)))[0].T  # (latent, dim)
        scale = noise * np.sqrt(dim / latent)  # same total variance as the isotropic case
        return scale * rng.normal(size=(count, latent)) @ basis + 0.1 * noise * rng.normal(size=(count, dim))

    x = centres[labels] + spread(len(labels)).astype(np.float32)
    queries = centres[q_labels] + spread(n_queries).astype(np.float32)
    np.save(folder / "x.npy", x.astype(np.float32))
    np.save(folder / "y.npy", labels)
    np.save(folder / "queries.npy", queries.astype(np.float32))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(kind: str, folder: Path) -> None:
    """Runs in a subprocess: one contender, prints one JSON line."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    x, y = np.load(folder / "x.npy"), np.load(folder / "y.npy")
    loaded_mb = peak_rss_mb()
    start = time.perf_counter()
    if kind == "metrix":
        from metrix.evaluation import retrieval_metrics

        out = retrieval_metrics(x, y)
        values = {k: out[k] for k in METRICS}
    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                                  k="max_bin_count", device=torch.device("cpu"))
        out = calc.get_accuracy(x, y)
        values = {"precision_at_1": out["precision_at_1"], "r_precision": out["r_precision"],
                  "map_at_r": out["mean_average_precision_at_r"]}
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_after_loading_mb": loaded_mb, **values}))


def gemm_rate(n=2048) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_exact(folder: Path, n: int, dim: int) -> None:
    results = {}
    for kind in ("metrix", "pml"):
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--folder", str(folder)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{kind} failed:\n{proc.stderr[-2000:]}")
            return
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    floor = 2 * n * n * dim / gemm_rate()
    m, p = results["metrix"], results["pml"]
    print(f"\n## exact evaluation, N={n:,}, D={dim}, query = reference")
    print("| contender | seconds | peak RSS MB | RSS after loading MB | x GEMM floor | precision@1 | R-precision | MAP@R |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in (("metrix", m), ("pytorch-metric-learning", p)):
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['rss_after_loading_mb']:.0f} | "
              f"{r['seconds'] / floor:.2f} | {r['precision_at_1']:.6f} | {r['r_precision']:.6f} | {r['map_at_r']:.6f} |")
    diff = max(abs(m[k] - p[k]) for k in METRICS)
    print(f"\nGEMM floor {floor:.1f} s; speed-up {p['seconds'] / m['seconds']:.2f}x; "
          f"max |metric difference| {diff:.2e} ({'OK' if diff <= 1e-4 else 'MISMATCH'})")


def run_ann(folder: Path) -> None:
    import torch

    from metrix.index import VectorIndex

    torch.set_num_threads(os.cpu_count() or 1)
    x, queries = np.load(folder / "x.npy"), np.load(folder / "queries.npy")
    exact = VectorIndex(x.shape[1], metric="euclidean")
    exact.add(x)
    t = _timed(lambda: exact.search(queries, 10))
    _, truth = exact.search(queries, 10)
    exact_qps = len(queries) / t
    print(f"\n## approximate search, N={len(x):,}, {len(queries):,} queries, k=10, L2")
    print(f"exact (metrix, torch, tiled): {exact_qps:,.0f} queries/s")
    print("| faiss index | build s | setting | recall@10 | queries/s | x exact |")
    print("|---|---|---|---|---|---|")
    settings = [
        ("HNSW32", {"ef_construction": 200}, "ef_search", [16, 32, 64, 128]),
        ("IVF1024,Flat", {}, "nprobe", [4, 8, 16, 32]),
        ("IVF1024,PQ32", {}, "nprobe", [8, 32]),
    ]
    for spec, build_options, knob, values in settings:
        index = VectorIndex(x.shape[1], metric="euclidean", backend="faiss", faiss_index=spec, **build_options)
        index.add(x)
        build = _timed(lambda: index.search(queries[:1], 1))  # the first search trains and builds
        for value in values:
            setattr(index, knob, value)
            index.search(queries[:100], 10)
            seconds = _timed(lambda: index.search(queries, 10))
            _, found = index.search(queries, 10)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
            qps = len(queries) / seconds
            label = spec + "".join(f", {k}={v}" for k, v in build_options.items())
            print(f"| {label} | {build:.1f} | {knob}={value} | {recall:.4f} | {qps:,.0f} | {qps / exact_qps:.1f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("exact", "ann", "both"), default="both")
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--noise", type=float, default=1.5, help="within-class spread (1.5: MAP@R about 0.35)")
    parser.add_argument("--latent", type=int, default=0,
                        help="0: isotropic noise (full intrinsic dimension); m: within-class variation in an m-d subspace")
    parser.add_argument("--worker", choices=("metrix", "pml"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.folder)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_data(folder, args.n, args.dim, args.classes, args.queries, args.noise, latent=args.latent)
        print(f"# evaluation_at_scale: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU threads, "
              f"N={args.n:,}, D={args.dim}, {args.classes} classes, noise {args.noise}, "
              f"{'isotropic' if not args.latent else f'{args.latent}-d latent'} within-class variation")
        if args.part in ("exact", "both"):
            run_exact(folder, args.n, args.dim)
        if args.part in ("ann", "both"):
            run_ann(folder)


if __name__ == "__main__":
    main()
