"""Retrieval on classes never seen in training (the metric-learning protocol), against baselines and PML.

Three parts, each printed as a table (mean ± std over seeds; CPU seconds of training per run):

1. **retrieval** — train on some classes, retrieve among the others (query = reference, self excluded):
   Fashion-MNIST (train on classes 0–4, test on 5–9), Omniglot (train on ``images_background``, test on
   ``images_evaluation``; a class is an alphabet's character), ORL faces (30 identities train, 10 unseen:
   identification rank-1 = P@1 among the unseen images, verification ROC AUC / EER over all their pairs).
   Methods: raw pixels; PCA fitted on the training classes; metrix (multi-similarity loss with its miner, P×K
   batches, Adam, :class:`metrix.training.Trainer`) with two networks (``--recipes``): ``convnet-4 + head``
   (Snell's 4-block conv net, a linear head, the head's embedding handed on) and ``convnet-3 + projection``
   (3 blocks, an MLP projection head that only trains, the backbone's features handed on:
   ``EmbeddingModel(output="features")``); pytorch-metric-learning's recipe with the same network, initial
   weights, loss, miner, batch shape, optimiser and epochs (``MPerClassSampler``, ``MultiSimilarityLoss``,
   ``MultiSimilarityMiner``, a plain loop) — measured in the same run. Every trained model is scored on both
   of its outputs (the head's embedding and the backbone's features), the one it hands on marked.
2. **transfer** — EfficientNet-Lite0 on Fashion-MNIST 0–4 → 5–9 (or ``--transfer-data omniglot``) at 64×64:
   the ImageNet features as they are;
   the pretrained network frozen with a trained head (linear probe); fine-tuned (backbone at 0.1 × lr); the
   same network from scratch. Same images, epochs and batches for the trained ones.
3. **throughput** — EfficientNet-Lite0 fine-tuning (forward + backward + Adam) in images/s at 224×224 and
   at 64×64 on this machine (and on a GPU where one is present).

    METRIX_DATA=../shared/data python benchmarks/unseen_classes.py                 # every part, 2 seeds
    METRIX_DATA=../shared/data python benchmarks/unseen_classes.py --part transfer --seeds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from sklearn.decomposition import PCA

from metrix.apps.verification import verification_metrics
from metrix.datasets import encode_labels, load_dataset
from metrix.distances import pairwise_distance
from metrix.evaluation import retrieval_metrics
from metrix.losses import MultiSimilarityLoss
from metrix.mining import MINERS
from metrix.models import EmbeddingModel, input_statistics
from metrix.training import Trainer

P, K, LR, DIM = 16, 8, 1e-3, 128  # P×K batches of 128; with fewer than 16 classes every class, K = 128 // classes


def batch_shape(y) -> tuple[int, int]:
    classes = len(np.unique(y))
    return (P, K) if classes >= P else (classes, 128 // classes)


def steps_per_epoch(y) -> int:
    from metrix.sampling import ClassBalancedBatchSampler

    return len(ClassBalancedBatchSampler(encode_labels(y)[0], *batch_shape(y), replacement=True))


def _subsample(X, y, per_class: int | None, seed: int):
    if per_class is None:
        return X, y
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)])
    return X[np.sort(keep)], y[np.sort(keep)]


def datasets(args):
    """name -> (X_train, y_train, X_test, y_test): disjoint classes."""
    out, wanted = {}, set(args.datasets.split(","))
    if "fashion" in wanted:
        fm = load_dataset("fashion-mnist:train")
        seen = fm.y < 5
        out["fashion-mnist 0-4 → 5-9"] = (*_subsample(fm.X[seen], fm.y[seen], args.fashion_per_class, 0),
                                          *_subsample(fm.X[~seen], fm.y[~seen], args.fashion_test_per_class, 1))
    if "omniglot" in wanted:
        bg, ev = load_dataset("omniglot:background"), load_dataset("omniglot:evaluation")
        out["omniglot background → evaluation"] = (bg.X, bg.y, ev.X, ev.y)
    if "orl" in wanted:
        orl = load_dataset("orl", image_size=(56, 46))
        ids = np.random.default_rng(0).permutation(np.unique(orl.y))
        train = np.isin(orl.y, ids[:30])
        out["orl 30 → 10 identities"] = (orl.X[train], orl.y[train], orl.X[~train], orl.y[~train])
    return out


# name -> EmbeddingModel options; the first hands on the head's embedding, the second the backbone's features
RECIPES = {
    "convnet-4 + head": {},
    "convnet-3 + projection": {"backbone_kwargs": {"blocks": 3}, "head_hidden_dim": 512, "output": "features"},
}


def _model(shape, seed, standardize_from=None, **kw):
    torch.manual_seed(seed)
    extra = {} if standardize_from is None else input_statistics(standardize_from)  # per channel, as metrix train
    return EmbeddingModel(kw.pop("backbone", "convnet"), DIM, input_shape=shape, **extra, **kw)


def train_metrix(X, y, seed, epochs, model=None, recipe="convnet-4 + head", **trainer_kw):
    model = model or _model(X.shape[1:], seed, X, **RECIPES[recipe])
    codes, _ = encode_labels(y)
    p, k = batch_shape(y)
    Trainer(model, MultiSimilarityLoss(), epochs=epochs, lr=LR, classes_per_batch=p, samples_per_class=k,
            seed=seed, progress=False, miner=MINERS["multi_similarity"](), scheduler="none", **trainer_kw).fit(X, codes)
    return model


def train_pml(X, y, seed, epochs, recipe="convnet-4 + head"):
    from pytorch_metric_learning import losses, miners, samplers

    model = _model(X.shape[1:], seed, X, **RECIPES[recipe])
    codes, _ = encode_labels(y)
    xt, yt = torch.from_numpy(X), torch.from_numpy(codes)
    p, k = batch_shape(y)
    steps = steps_per_epoch(y)  # the same number of batches per epoch as metrix's sampler: the same budget
    sampler = samplers.MPerClassSampler(codes, m=k, batch_size=p * k, length_before_new_iter=steps * p * k)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=p * k, sampler=sampler)
    loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-4)
    torch.manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            emb = model.project(xb)  # the head's embedding (what the model hands on may be its features)
            loss = loss_fn(emb, yb, miner(emb, yb))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def scores(emb, y, faces: bool) -> dict:
    r = retrieval_metrics(emb, y, metric="euclidean")
    out = {"MAP@R": r["map_at_r"], "P@1": r["precision_at_1"]}
    if faces:
        e = torch.as_tensor(emb, dtype=torch.float32)
        d = pairwise_distance(e, e, "euclidean").numpy()
        same = np.asarray(y)[:, None] == np.asarray(y)[None, :]
        upper = np.triu_indices(len(y), 1)
        v = verification_metrics(d[upper], same[upper])
        out.update({"AUC": v["roc_auc"], "EER": v["eer"]})
    return out


OUTPUT_NAMES = {"head": "head's embedding", "features": "backbone features"}


def _output(model, x, output: str) -> np.ndarray:
    """One of a model's two outputs: the head's embedding (unit vectors) or the backbone's features
    (L2-normalised: compared by cosine, as a features model hands them on)."""
    if output == "head":
        with torch.no_grad():
            model.eval()
            return torch.cat([model.project(torch.from_numpy(x[i:i + 1024])) for i in range(0, len(x), 1024)]).numpy()
    return torch.nn.functional.normalize(model.embed(x, features=True), dim=1).numpy()


def _timed(fn):
    start = time.process_time()
    value = fn()
    return value, time.process_time() - start


def part_retrieval(args):
    rows = []
    for name, (Xtr, ytr, Xte, yte) in datasets(args).items():
        faces = name.startswith("orl")
        epochs = args.epochs_faces if faces else args.epochs_omniglot if name.startswith("omniglot") else args.epochs
        flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
        results = {"raw pixels": [scores(flat(Xte), yte, faces)]}
        results["PCA"] = [scores(PCA(min(64, len(Xtr) - 1), random_state=0).fit(flat(Xtr)).transform(flat(Xte)), yte, faces)]
        times = {}
        for seed in range(args.seeds):  # the two libraries alternate
            for recipe in args.recipes.split(","):
                for method, train in (("metrix", train_metrix), ("pytorch-metric-learning", train_pml)):
                    model, cpu = _timed(lambda: train(Xtr, ytr, seed, epochs, recipe=recipe))
                    for output in OUTPUT_NAMES:
                        mark = " (handed on)" if output == model.output else ""
                        key = f"{method}, {recipe}: {OUTPUT_NAMES[output]}{mark}"
                        results.setdefault(key, []).append(scores(_output(model, Xte, output), yte, faces))
                        times.setdefault(key, []).append(cpu)
        rows.append((name, f"{epochs} epochs × {steps_per_epoch(ytr)} batches", results, times))
    print(f"\n## retrieval on unseen classes (→ {DIM}-d head, multi-similarity + its miner, batches of 128 "
          f"({P}×{K}, or every class), Adam {LR:g}; {args.seeds} seeds)")
    for name, epochs, results, times in rows:
        keys = list(results["raw pixels"][0])
        print(f"\n### {name} ({epochs})\n| method | " + " | ".join(keys) + " | train CPU s |\n|---|"
              + "---|" * (len(keys) + 1))
        for method, runs in results.items():
            cells = [_mean_std([r[k] for r in runs]) for k in keys]
            t = _mean_std(times[method]) if method in times else "—"
            print(f"| {method} | " + " | ".join(cells) + f" | {t} |")


def part_transfer(args):
    if args.transfer_data == "omniglot":
        bg, ev = load_dataset("omniglot:background"), load_dataset("omniglot:evaluation")
        Xtr, ytr = _subsample(bg.X, bg.y, args.transfer_per_class, 0)
        Xte, yte = _subsample(ev.X, ev.y, args.transfer_test_per_class, 1)
        where = "Omniglot background → evaluation"
    else:
        fm = load_dataset("fashion-mnist:train")
        seen = fm.y < 5
        Xtr, ytr = _subsample(fm.X[seen], fm.y[seen], args.transfer_per_class, 0)
        Xte, yte = _subsample(fm.X[~seen], fm.y[~seen], args.transfer_test_per_class, 1)
        where = "Fashion-MNIST 0–4 → 5–9"
    size = {"image_size": args.transfer_size}
    variants = {
        "ImageNet features (no training)": None,
        "pretrained, frozen + trained head": dict(pretrained=True, freeze_backbone=True),
        "pretrained, fine-tuned (backbone 0.1 × lr)": dict(pretrained=True, backbone_lr_scale=0.1),
        "pretrained, fine-tuned, BatchNorm statistics frozen": dict(pretrained=True, backbone_lr_scale=0.1,
                                                                    freeze_batchnorm=True),
        "pretrained, fine-tuned, BatchNorm statistics frozen, projection head (features handed on)": dict(
            pretrained=True, backbone_lr_scale=0.1, freeze_batchnorm=True,
            model={"head_hidden_dim": 512, "output": "features"}),
        "same network from scratch": dict(pretrained=False),
    }
    results, times = {}, {}
    if args.variants:
        variants = {name: v for name, v in variants.items() if any(w in name for w in args.variants.split(","))}
    for seed in range(args.seeds):
        for name, v in variants.items():
            if v is None:
                if seed == 0:
                    model = _model(Xtr.shape[1:], seed, backbone="efficientnet_lite0", backbone_kwargs=size)
                    features = torch.nn.functional.normalize(model.embed(Xte, features=True), dim=1)  # cosine
                    results[name] = [scores(features.numpy(), yte, False)]
                continue
            v = dict(v)
            kw = {"backbone_kwargs": {**size, "pretrained": v.pop("pretrained")}, **v.pop("model", {})}
            model = _model(Xtr.shape[1:], seed, backbone="efficientnet_lite0", **kw)
            model, cpu = _timed(lambda: train_metrix(Xtr, ytr, seed, args.transfer_epochs, model=model, **v))
            results.setdefault(name, []).append(scores(model.embed(Xte).numpy(), yte, False))
            times.setdefault(name, []).append(cpu)
    print(f"\n## transfer: EfficientNet-Lite0 at {args.transfer_size}×{args.transfer_size}, {where} "
          f"({len(ytr)} training images, {len(yte)} test images, {args.transfer_epochs} epochs, {args.seeds} seeds)")
    print("| variant | MAP@R | P@1 | train CPU s |\n|---|---|---|---|")
    for name, runs in results.items():
        t = _mean_std(times[name]) if name in times else "—"
        print(f"| {name} | {_mean_std([r['MAP@R'] for r in runs])} | {_mean_std([r['P@1'] for r in runs])} | {t} |")


def part_throughput(args):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("\n## EfficientNet-Lite0 fine-tuning throughput (forward + backward + Adam step)")
    print("| device | resolution | batch | images/s |\n|---|---|---|---|")
    for device in devices:
        for size, batch in ((224, 32 if device == "cuda" else 16), (64, 256 if device == "cuda" else 64)):
            model = _model((3, size, size), 0, backbone="efficientnet_lite0", backbone_kwargs={"image_size": size}).to(device)
            x = torch.rand(batch, 3, size, size, device=device)
            opt = torch.optim.Adam(model.parameters(), 1e-4)
            steps = 3 if device == "cpu" else 10
            for i in range(steps + 1):
                if i == 1:
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                opt.zero_grad()
                model(x).sum().backward()
                opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"| {device} | {size}×{size} | {batch} | {batch * steps / (time.perf_counter() - start):.1f} |")


def _mean_std(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():.4f}" if len(values) == 1 else f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", default="all", choices=("all", "retrieval", "transfer", "throughput"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="Fashion-MNIST")
    parser.add_argument("--epochs-omniglot", type=int, default=2, help="Omniglot (19,280 training images)")
    parser.add_argument("--epochs-faces", type=int, default=15, help="ORL (300 training images)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--datasets", default="fashion,omniglot,orl", help="comma-separated: fashion, omniglot, orl")
    parser.add_argument("--fashion-per-class", type=int, default=1200)
    parser.add_argument("--fashion-test-per-class", type=int, default=600)
    parser.add_argument("--transfer-data", default="fashion-mnist", choices=("fashion-mnist", "omniglot"))
    parser.add_argument("--transfer-size", type=int, default=64)
    parser.add_argument("--variants", default="", help="only the transfer variants whose name holds one of these words")
    parser.add_argument("--transfer-epochs", type=int, default=3)
    parser.add_argument("--transfer-per-class", type=int, default=400)
    parser.add_argument("--transfer-test-per-class", type=int, default=300)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    if args.part in ("all", "throughput"):
        part_throughput(args)
    if args.part in ("all", "transfer"):
        part_transfer(args)
    if args.part in ("all", "retrieval"):
        part_retrieval(args)


if __name__ == "__main__":
    main()
