"""What ``metrix selfsup train / eval`` do: contrastive learning without labels, judged on frozen features."""

from __future__ import annotations

from pathlib import Path

from metrix import distributed
from metrix.apps.augment import ImageAugment
from metrix.apps.selfsup import ContrastiveLearner, evaluate_features, random_encoder_features
from metrix.datasets import load_digits_dataset, load_fashion_mnist, stratified_split
from metrix.checkpoints import CHECKPOINTS, LoopCheckpoint, interrupted, start_or_resume


def images(data: str, root, download: bool = False):
    """``(train X, train y, test X, test y)`` as float32 images in [0, 1]: Fashion-MNIST's official split, or
    the bundled digits split 70/30."""
    if data == "fashion-mnist":
        tr, te = (load_fashion_mnist(root, s, download_missing=download) for s in ("train", "test"))
        return tr.X, tr.y, te.X, te.y
    if data == "digits":
        ds = load_digits_dataset()
        X = (ds.X / 16.0).reshape(-1, 1, 8, 8).astype("float32")
        tr, te = stratified_split(ds.y, 0.3, seed=0)
        return X[tr], ds.y[tr], X[te], ds.y[te]
    raise ValueError(f"unknown --data {data!r}: use 'fashion-mnist' or 'digits'")


COMMAND = "metrix selfsup train"


def train(method: str = "simclr", data: str = "fashion-mnist", root="data/fashion_mnist", out=None,
          download: bool = False, epochs: int = 5, batch_size: int = 256, train_size: int | None = None,
          lr: float = 1e-3, temperature: float | None = None, queue_size: int = 4096, momentum: float = 0.99,
          flip: float | None = None, seed: int = 0, checkpoint_every: int = 1, resume=None, echo=print) -> Path:
    """Train an encoder on the training images with the labels hidden; saves it into the run folder ``out``
    (new or empty; default ``runs/<method>``) and returns that folder. A checkpoint is written every
    ``checkpoint_every`` epochs; ``resume`` (an interrupted run folder) continues it with its own settings."""
    settings = dict(method=method, data=data, root=str(root), download=download, epochs=int(epochs),
                    batch_size=int(batch_size), train_size=train_size, lr=float(lr), temperature=temperature,
                    queue_size=int(queue_size), momentum=float(momentum), flip=flip, seed=int(seed),
                    checkpoint_every=int(checkpoint_every))
    run_dir, s, resuming = start_or_resume(COMMAND, out, method, settings, resume)
    if resuming:
        echo(f"resuming {run_dir} from its last checkpoint")
    X, *_ = distributed.rank_zero_first(lambda download: images(s["data"], s["root"], download), s["download"])
    X = X[: s["train_size"]] if s["train_size"] else X
    flip = s["flip"] if s["flip"] is not None else (0.0 if s["data"] == "digits" else 0.5)
    learner = ContrastiveLearner(s["method"], input_shape=X.shape[1:], temperature=s["temperature"],
                                 queue_size=s["queue_size"], momentum=s["momentum"],
                                 augment=ImageAugment(flip=flip, seed=s["seed"]), seed=s["seed"])
    ckpt = LoopCheckpoint(run_dir / CHECKPOINTS, s["checkpoint_every"])
    batch_size = min(s["batch_size"], len(X))
    try:
        learner.fit(X, s["epochs"], batch_size, s["lr"], log_every=max(s["epochs"] * (len(X) // batch_size) // 10, 1),
                    echo=echo, checkpoint=ckpt, resume=resuming)
    except KeyboardInterrupt:
        raise interrupted(run_dir, ckpt, "epoch", s["epochs"], COMMAND) from None
    if distributed.get_rank() == 0:
        learner.save(run_dir)
    return run_dir


def evaluate(model, data: str, root, download: bool = False, k: int = 20, baselines: bool = False) -> dict:
    """kNN and linear-probe accuracy of the frozen features (test images against the training images); with
    ``baselines`` also of raw pixels and of the same encoder untrained. Returns one row per feature kind."""
    learner = ContrastiveLearner.load(model)
    Xtr, ytr, Xte, yte = images(data, root, download)
    rows = {"trained": evaluate_features(learner.features(Xtr, progress="trained: train features"), ytr,
                                         learner.features(Xte, progress="trained: test features"), yte, k,
                                         progress="trained")}
    if baselines:
        rows["raw pixels"] = evaluate_features(Xtr, ytr, Xte, yte, k, progress="raw pixels")
        shape, kw = Xtr.shape[1:], {"seed": learner.seed, "pixel_mean": float(Xtr.mean()),
                                     "pixel_std": float(Xtr.std()), **learner.model.backbone_kwargs}
        rows["random encoder"] = evaluate_features(
            random_encoder_features(Xtr, shape, progress="random encoder: train features", **kw), ytr,
            random_encoder_features(Xte, shape, progress="random encoder: test features", **kw), yte, k,
            progress="random encoder")
    return rows
