"""Self-supervised contrastive learning on Fashion-MNIST (issue 7, part 1).

SimCLR and MoCo v2 train the default conv-net encoder on the 60,000 training images with the labels
hidden; the frozen backbone features are then evaluated on the 10,000 test images: kNN accuracy
(cosine, k=20, test queries against the training set) and a linear probe (multinomial logistic
regression, L-BFGS). Baselines: the same encoder untrained (random initialisation) and raw pixels.
Training CPU time is the process CPU time of ``fit`` (both cores count), wall time beside it.

    python benchmarks/apps_selfsup_fashion.py [--epochs 5] [--train-size 60000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from metrix.apps.selfsup import ContrastiveLearner, evaluate_features, random_encoder_features
from metrix.datasets import load_fashion_mnist

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion_mnist"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-size", type=int, default=60000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=["simclr", "moco"])
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found")
    train, test = load_fashion_mnist(DATA, "train"), load_fashion_mnist(DATA, "test")
    Xtr, ytr = train.X[: args.train_size], train.y[: args.train_size]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; train {len(Xtr)}, test {len(test.X)}; "
          f"epochs {args.epochs}, batch {args.batch_size}, seed {args.seed}")
    rows = [{"encoder": "raw pixels", **evaluate_features(Xtr, ytr, test.X, test.y)}]
    rnd = dict(seed=args.seed, pixel_mean=float(Xtr.mean()), pixel_std=float(Xtr.std()))  # as fit() standardises
    rows.append({"encoder": "random conv net", **evaluate_features(
        random_encoder_features(Xtr, Xtr.shape[1:], **rnd), ytr, random_encoder_features(test.X, Xtr.shape[1:], **rnd), test.y)})
    for method in args.methods:
        learner = ContrastiveLearner(method, input_shape=Xtr.shape[1:], seed=args.seed)
        wall, cpu = time.perf_counter(), time.process_time()
        history = learner.fit(Xtr, epochs=args.epochs, batch_size=args.batch_size, log_every=100)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        metrics = evaluate_features(learner.features(Xtr), ytr, learner.features(test.X), test.y)
        rows.append({"encoder": f"{method} ({args.epochs} epochs)", **metrics, "train_wall_s": wall, "train_cpu_s": cpu,
                     "final_loss": float(np.mean(history[-50:]))})
        print(rows[-1], flush=True)
    print("\n| encoder | kNN acc (k=20, cosine) | linear probe | dim | train wall s | train CPU s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        t = f"{r['train_wall_s']:.0f} | {r['train_cpu_s']:.0f}" if "train_wall_s" in r else "– | –"
        print(f"| {r['encoder']} | {r['knn_accuracy']:.4f} | {r['linear_probe_accuracy']:.4f} | {r['dim']} | {t} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
