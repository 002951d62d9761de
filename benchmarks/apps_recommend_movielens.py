"""Metric-learning recommenders on MovieLens-100K (issue 7, part 2).

Implicit feedback (rating >= 4 is a positive): CML vs BPR, same embedding size (64), 20 epochs, Adam 5e-3,
20 sampled negatives per positive, on (a) the official u1 split and (b) per-user leave-one-out of all positives;
full ranking over unseen items (Recall@10/50, NDCG@10, HR@10, coverage@10). Explicit ratings on u1:
MetricRatingModel (μ + b_u + b_i − ||x_u − y_i||²_W) vs biased MF, RMSE / MAE. Mean ± std over seeds.
The data is read from ../shared/data/movielens_100k and never shipped.

    python benchmarks/apps_recommend_movielens.py [--seeds 3] [--epochs 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from metrix.apps.recommend import (
    BPR, CML, BiasedMF, MetricRatingModel, fit_explicit, fit_implicit, leave_one_out, load_movielens_100k,
    ranking_metrics, rating_metrics,
)

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens_100k"
KEYS = ("recall@10", "recall@50", "ndcg@10", "hr@10", "coverage@10")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    train, test = load_movielens_100k(ML100K, "u1")
    loo_train, loo_test = leave_one_out(load_movielens_100k(ML100K).positives())
    splits = {"u1": (train.positives(), test.positives()), "leave-one-out": (loo_train, loo_test)}
    implicit, explicit, seconds = {}, {}, {}
    for seed in range(args.seeds):
        for split, (tr, te) in splits.items():
            for name, model in (("CML", CML(tr.n_users, tr.n_items, args.dim, margin=1.0, seed=seed)),
                                ("BPR", BPR(tr.n_users, tr.n_items, args.dim, seed=seed))):
                start = time.process_time()
                fit_implicit(model, tr, epochs=args.epochs, lr=5e-3, n_negatives=20, seed=seed)
                seconds.setdefault(name, []).append(time.process_time() - start)
                implicit.setdefault((split, name), []).append(ranking_metrics(model, tr, te))
        mean = float(train.ratings.mean())
        for name, model in (("MetricRatingModel", MetricRatingModel(train.n_users, train.n_items, args.dim, mean, seed)),
                            ("biased MF", BiasedMF(train.n_users, train.n_items, args.dim, mean, seed))):
            start = time.process_time()
            fit_explicit(model, train, epochs=args.epochs, lr=5e-3, l2=0.1, seed=seed)
            seconds.setdefault(name, []).append(time.process_time() - start)
            explicit.setdefault(name, []).append(rating_metrics(model, test))
    print(f"\nMovieLens-100K, {time.strftime('%Y-%m-%d')}, dim {args.dim}, {args.epochs} epochs, {args.seeds} seeds; "
          "CPU seconds per fit: " + ", ".join(f"{k} {np.mean(v):.0f}" for k, v in seconds.items()) + "\n")
    print("| split | model | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for (split, name), rs in implicit.items():
        cells = [f"{np.mean([r[k] for r in rs]):.4f} ± {np.std([r[k] for r in rs]):.4f}" for k in KEYS]
        print(f"| {split} | {name} | " + " | ".join(cells) + " |")
    print("\n| u1 explicit | RMSE | MAE |\n|---|---|---|")
    for name, rs in explicit.items():
        print(f"| {name} | {np.mean([r['rmse'] for r in rs]):.4f} ± {np.std([r['rmse'] for r in rs]):.4f} | "
              f"{np.mean([r['mae'] for r in rs]):.4f} ± {np.std([r['mae'] for r in rs]):.4f} |")


if __name__ == "__main__":
    main()
