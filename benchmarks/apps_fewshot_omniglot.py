"""Prototypical networks on Omniglot (issue 6, part 3): 5/20-way, 1/5-shot test accuracy.

Snell et al. (2017): background set with 90° rotations as extra classes for training (their split
of 1,200 characters differs; here the official background/evaluation split is used, as in
Lake et al.), 28×28, 4-block conv net, Adam 1e-3 halved every 2,000 episodes, 60-way 5-shot 5-query
training episodes. The CPU budget here trains 20-way 5-shot 5-query episodes (``--episodes``);
tests on the evaluation set: 1,000 episodes each of 5-way / 20-way, 1-shot / 5-shot, 15 queries,
mean accuracy ± 95% confidence interval.

    python benchmarks/apps_fewshot_omniglot.py [--episodes 1500] [--train-way 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from metrix.apps.fewshot import PrototypicalNetwork, rotate_classes
from metrix.datasets import load_omniglot

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
PAPER = {(5, 1): 0.988, (5, 5): 0.997, (20, 1): 0.960, (20, 5): 0.989}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=1500)
    parser.add_argument("--train-way", type=int, default=20)
    parser.add_argument("--test-episodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bg = load_omniglot(OMNIGLOT, "background")
    ev = load_omniglot(OMNIGLOT, "evaluation")
    X, y = rotate_classes(bg.X, bg.y)
    torch.manual_seed(args.seed)
    net = PrototypicalNetwork()
    wall, cpu = time.perf_counter(), time.process_time()
    net.fit(X, y, n_way=args.train_way, k_shot=5, n_query=5, episodes=args.episodes, lr=1e-3,
            lr_halve_every=max(args.episodes // 3, 1), seed=args.seed, log_every=250,
            echo=lambda s: print(s, flush=True))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"\nOmniglot prototypical network, {time.strftime('%Y-%m-%d')}: trained {args.episodes} episodes of "
          f"{args.train_way}-way 5-shot 5-query on {len(np.unique(y))} classes (background + rotations) in "
          f"{wall:.0f} s wall / {cpu:.0f} s CPU ({torch.get_num_threads()} threads); "
          f"tested on {len(np.unique(ev.y))} evaluation classes, {args.test_episodes} episodes, 15 queries\n")
    print("| task | metrix | Snell et al. 2017 |")
    print("|---|---|---|")
    for (way, shot), paper in PAPER.items():
        r = net.evaluate(ev.X, ev.y, way, shot, 15, args.test_episodes, seed=1000 + args.seed)
        print(f"| {way}-way {shot}-shot | {r['accuracy']:.4f} ± {r['ci95']:.4f} | {paper:.3f} |", flush=True)


if __name__ == "__main__":
    main()
