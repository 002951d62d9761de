"""OOD / anomaly detection on Fashion-MNIST (issue 6, part 2).

An embedding is trained (supervised NT-Xent, convnet) on Fashion-MNIST classes 0–5 only; a
classifier with the same backbone is trained with cross-entropy on the same images for the
max-softmax-probability (MSP) baseline. In-distribution = test images of classes 0–5; OOD sets:
(a) novelty = test images of classes 6–9 (shirt, sneaker, bag, ankle boot); (b) anomaly = Omniglot
evaluation characters resized to 28×28 (strokes inverted to Fashion-MNIST's light-on-dark).
Reported: AUROC and FPR at 95% TPR for MahalanobisDetector and KNNDetector (on the metric
embedding and on the classifier's features) and MSP.

    python benchmarks/apps_ood_fashion.py [--per-class 2000] [--epochs 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metrix.apps.ood import KNNDetector, MahalanobisDetector, max_softmax_score, ood_metrics
from metrix.datasets import load_fashion_mnist, load_omniglot
from metrix.losses import NTXentLoss
from metrix.models import EmbeddingModel
from metrix.training import Trainer, optimizer_step

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def train_classifier(X, y, n_classes, epochs, seed, batch=256):
    torch.manual_seed(seed)
    body = EmbeddingModel("convnet", 64, normalize=False, input_shape=X.shape[1:],
                          input_mean=torch.tensor(X.mean()), input_std=torch.tensor(X.std()))
    head = nn.Linear(64, n_classes)
    model = nn.Sequential(body, head)
    opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(X) + batch - 1) // batch))
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=g).split(batch):
            optimizer_step(nn.functional.cross_entropy(model(Xt[idx]), yt[idx]), opt)
            sched.step()
    model.eval()
    return body, head


@torch.no_grad()
def logits_and_features(body, head, X, batch=2048):
    feats = torch.cat([body(torch.from_numpy(X[i : i + batch])) for i in range(0, len(X), batch)])
    return head(feats).numpy(), feats.numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=2000, help="training images per in-distribution class")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--omniglot", type=int, default=4000, help="Omniglot images scored")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    train = load_fashion_mnist(DATA / "fashion_mnist", "train")
    test = load_fashion_mnist(DATA / "fashion_mnist", "test")
    keep = np.concatenate([rng.choice(np.flatnonzero(train.y == c), args.per_class, replace=False) for c in range(6)])
    X, y = train.X[keep], train.y[keep]
    x_in, x_novel = test.X[test.y < 6], test.X[test.y >= 6]
    omni = load_omniglot(DATA / "omniglot", "evaluation")
    x_anom = omni.X[rng.choice(len(omni.X), args.omniglot, replace=False)]

    torch.manual_seed(args.seed)
    model = EmbeddingModel("convnet", 64, input_shape=X.shape[1:],
                           input_mean=torch.tensor(X.mean()), input_std=torch.tensor(X.std()))
    t0 = time.process_time()
    Trainer(model, NTXentLoss(temperature=0.1), epochs=args.epochs, classes_per_batch=6, samples_per_class=32,
            seed=args.seed, progress=False).fit(X, y)
    t_metric = time.process_time() - t0
    t0 = time.process_time()
    body, head = train_classifier(X, y, 6, args.epochs, args.seed)
    t_clf = time.process_time() - t0

    emb = {name: model.embed(a).numpy() for name, a in [("train", X), ("in", x_in), ("novel", x_novel), ("anom", x_anom)]}
    clf = {name: logits_and_features(body, head, a) for name, a in [("train", X), ("in", x_in), ("novel", x_novel), ("anom", x_anom)]}
    acc = float(np.mean(clf["in"][0].argmax(1) == test.y[test.y < 6]))
    rows = []

    def add(name, score):
        s_in = score("in")
        rows.append((name, ood_metrics(s_in, score("novel")), ood_metrics(s_in, score("anom"))))

    maha = MahalanobisDetector().fit(emb["train"], y)
    add("Mahalanobis on metrix embedding", lambda k: maha.score(emb[k]))
    knn = KNNDetector(k=10).fit(emb["train"])
    add("kNN (k=10) on metrix embedding", lambda k: knn.score(emb[k]))
    add("max softmax probability (classifier)", lambda k: max_softmax_score(clf[k][0]))
    maha_c = MahalanobisDetector().fit(clf["train"][1], y)
    add("Mahalanobis on classifier features", lambda k: maha_c.score(clf[k][1]))
    knn_c = KNNDetector(k=10).fit(clf["train"][1])
    add("kNN (k=10) on classifier features", lambda k: knn_c.score(clf[k][1]))

    print(f"\nFashion-MNIST classes 0–5 in-distribution ({len(X)} training images, {args.epochs} epochs, seed {args.seed}), "
          f"{time.strftime('%Y-%m-%d')}; CPU time: metric embedding {t_metric:.0f} s, classifier {t_clf:.0f} s "
          f"({torch.get_num_threads()} threads); classifier test accuracy on classes 0–5: {acc:.4f}\n")
    print(f"in-distribution: {len(x_in)} test images; novelty: {len(x_novel)} test images of classes 6–9; "
          f"anomaly: {len(x_anom)} Omniglot evaluation images\n")
    print("| detector | novelty AUROC | novelty FPR@95TPR | Omniglot AUROC | Omniglot FPR@95TPR |")
    print("|---|---|---|---|---|")
    for name, nov, an in rows:
        print(f"| {name} | {nov['auroc']:.4f} | {nov['fpr_at_95_tpr']:.4f} | {an['auroc']:.4f} | {an['fpr_at_95_tpr']:.4f} |")


if __name__ == "__main__":
    main()
