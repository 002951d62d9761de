"""What the Poincaré ball costs against the Euclidean distance, on the same inputs in the same process.

Pair losses (B=1024, D=128, 64 classes x 16, forward+backward, calls alternating) and exact kNN
(5,000 queries against 100,000 points, D=64, k=10). The points are ``expmap0`` of Gaussian vectors, so
both metrics see the same coordinates.

    python benchmarks/poincare_cost.py
"""

from __future__ import annotations

import statistics
import time

import torch

from metrix import losses as L
from metrix.distances import expmap0
from metrix.neighbors import knn


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    torch.manual_seed(0)
    n = 1024
    labels = torch.arange(64).repeat_interleave(16)[torch.randperm(n)]
    points = expmap0(0.1 * torch.randn(n, 128))
    cases = {
        "contrastive": lambda x, m: L.contrastive_loss(x, labels, metric=m),
        "contrastive, m_neg=1.4": lambda x, m: L.contrastive_loss(x, labels, neg_margin=1.4, metric=m),
        "triplet (semi-hard)": lambda x, m: L.triplet_margin_loss(x, labels, margin=0.2, triplets="semihard", metric=m),
        "generalized lifted": lambda x, m: L.generalized_lifted_structure_loss(x, labels, metric=m),
    }
    print(f"# poincare_cost: {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"| {'case':<36} | {'euclidean ms':>12} | {'poincare ms':>11} | {'ratio':>5} |")
    print(f"|{'-' * 38}|{'-' * 14}|{'-' * 13}|{'-' * 7}|")
    for name, loss in cases.items():
        def step(metric):
            x = points.clone().requires_grad_()
            loss(x, metric).backward()
        for metric in ("euclidean", "poincare"):
            step(metric)  # warm-up
        times = {"euclidean": [], "poincare": []}
        for _ in range(15):
            for metric in times:
                times[metric].append(median_ms(lambda: step(metric), 1))
        e, p = (statistics.median(times[m]) for m in ("euclidean", "poincare"))
        print(f"| {name:<36} | {e:>12.1f} | {p:>11.1f} | {p / e:>5.2f} |")
    data = expmap0(0.5 * torch.randn(100_000, 64))
    queries = data[:5000]
    e = median_ms(lambda: knn(queries, data, k=10, metric="euclidean"), 3)
    p = median_ms(lambda: knn(queries, data, k=10, metric="poincare"), 3)
    print(f"| {'kNN 5,000 x 100,000, k=10':<36} | {e:>12.1f} | {p:>11.1f} | {p / e:>5.2f} |")


if __name__ == "__main__":
    main()
