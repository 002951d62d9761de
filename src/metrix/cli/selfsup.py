"""metrix selfsup train / eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from metrix.cli.common import app, command_group


selfsup_app = command_group(help="Self-supervised contrastive learning (SimCLR, MoCo v2) without labels, judged by kNN and a linear probe.")
app.add_typer(selfsup_app, name="selfsup")

_SELFSUP_DATA_HELP = "'fashion-mnist' (the official IDX files in --root; --download fetches them) or 'digits' (bundled 8×8, offline)."


def _selfsup_data(data: str, root: Path, download: bool):
    """(train X, train y, test X, test y) as float32 images in [0, 1]."""
    from metrix.datasets import load_digits_dataset, load_fashion_mnist, stratified_split

    if data == "fashion-mnist":
        tr, te = (load_fashion_mnist(root, s, download_missing=download) for s in ("train", "test"))
        return tr.X, tr.y, te.X, te.y
    if data == "digits":
        ds = load_digits_dataset()
        X = (ds.X / 16.0).reshape(-1, 1, 8, 8).astype("float32")
        tr, te = stratified_split(ds.y, 0.3, seed=0)
        return X[tr], ds.y[tr], X[te], ds.y[te]
    raise ValueError(f"unknown --data {data!r}: use 'fashion-mnist' or 'digits'")


@selfsup_app.command("train")
def selfsup_train(
    method: str = typer.Option("simclr", help="'simclr' (two views, NT-Xent over the batch) or 'moco' (momentum encoder + queue of negatives)."),
    data: str = typer.Option("fashion-mnist", help=_SELFSUP_DATA_HELP),
    root: Path = typer.Option(Path("data/fashion_mnist"), help="Folder of the Fashion-MNIST IDX files."),
    download: bool = typer.Option(False, "--download", help="Fetch missing Fashion-MNIST files from the official address."),
    out: Path = typer.Option(Path("runs/selfsup"), help="Folder that receives model.safetensors and config.json."),
    epochs: int = typer.Option(5, help="Passes over the training images."),
    batch_size: int = typer.Option(256, help="Images per step (SimCLR compares 2× this many views)."),
    train_size: Optional[int] = typer.Option(None, help="Use only the first N training images."),
    lr: float = typer.Option(1e-3, help="Adam learning rate (cosine-decayed to 0)."),
    temperature: Optional[float] = typer.Option(None, help="NT-Xent temperature (default 0.5 SimCLR, 0.2 MoCo)."),
    queue_size: int = typer.Option(4096, help="MoCo: negatives kept in the queue."),
    momentum: float = typer.Option(0.99, help="MoCo: key-encoder momentum."),
    flip: Optional[float] = typer.Option(None, help="Probability of a horizontal flip (default 0.5; 0 for digits, where mirroring changes meaning)."),
    seed: int = typer.Option(0, help="Seed of initialisation, batch order and augmentations."),
) -> None:
    """Train an encoder on the training images with labels hidden; the labels are used only by 'selfsup eval'."""
    from metrix.apps.augment import ImageAugment
    from metrix.apps.selfsup import ContrastiveLearner

    X, *_ = _selfsup_data(data, root, download)
    X = X[:train_size] if train_size else X
    augment = ImageAugment(flip=flip if flip is not None else (0.0 if data == "digits" else 0.5), seed=seed)
    learner = ContrastiveLearner(method, input_shape=X.shape[1:], temperature=temperature, queue_size=queue_size,
                                 momentum=momentum, augment=augment, seed=seed)
    learner.fit(X, epochs, min(batch_size, len(X)), lr, log_every=max(epochs * (len(X) // batch_size) // 10, 1), echo=typer.echo)
    learner.save(out)
    typer.echo(f"saved {out}")


@selfsup_app.command("eval")
def selfsup_eval(
    model: Path = typer.Argument(..., help="Folder written by 'metrix selfsup train'."),
    data: str = typer.Option("fashion-mnist", help=_SELFSUP_DATA_HELP),
    root: Path = typer.Option(Path("data/fashion_mnist"), help="Folder of the Fashion-MNIST IDX files."),
    download: bool = typer.Option(False, "--download", help="Fetch missing Fashion-MNIST files."),
    k: int = typer.Option(20, help="Neighbours of the kNN vote (cosine)."),
    baselines: bool = typer.Option(False, "--baselines", help="Also score raw pixels and the same encoder untrained."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """kNN accuracy and linear-probe accuracy of the frozen features: test images against the training images."""
    from metrix.apps.selfsup import ContrastiveLearner, evaluate_features, random_encoder_features

    learner = ContrastiveLearner.load(model)
    Xtr, ytr, Xte, yte = _selfsup_data(data, root, download)
    rows = {"trained": evaluate_features(learner.features(Xtr), ytr, learner.features(Xte), yte, k)}
    if baselines:
        rows["raw pixels"] = evaluate_features(Xtr, ytr, Xte, yte, k)
        shape, kw = Xtr.shape[1:], {"seed": learner.seed, "pixel_mean": float(Xtr.mean()),
                                     "pixel_std": float(Xtr.std()), **learner.model.backbone_kwargs}
        rows["random encoder"] = evaluate_features(random_encoder_features(Xtr, shape, **kw), ytr,
                                                   random_encoder_features(Xte, shape, **kw), yte, k)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'features':<16}{'kNN acc':>9}{'linear probe':>14}{'dim':>6}")
    for name, r in rows.items():
        typer.echo(f"{name:<16}{r['knn_accuracy']:>9.4f}{r['linear_probe_accuracy']:>14.4f}{r['dim']:>6}")
