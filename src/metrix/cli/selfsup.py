"""metrix selfsup train / eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from metrix.cli.common import (app, checkpoint_option, command_group, nproc_option, rank_echo, refuse_flags_with_resume,
                               resume_option, run_on_processes)


selfsup_app = command_group(help="Self-supervised contrastive learning (SimCLR, MoCo v2) without labels, judged by kNN and a linear probe.")
app.add_typer(selfsup_app, name="selfsup")

_SELFSUP_DATA_HELP = "'fashion-mnist' (the official IDX files in --root; --download fetches them) or 'digits' (bundled 8×8, offline)."


@selfsup_app.command("train")
def selfsup_train(
    ctx: typer.Context,
    method: str = typer.Option("simclr", help="'simclr' (two views, NT-Xent over the batch) or 'moco' (momentum encoder + queue of negatives)."),
    data: str = typer.Option("fashion-mnist", help=_SELFSUP_DATA_HELP),
    root: Path = typer.Option(Path("data/fashion_mnist"), help="Folder of the Fashion-MNIST IDX files."),
    download: bool = typer.Option(False, "--download", help="Fetch missing Fashion-MNIST files from the official address."),
    out: Optional[Path] = typer.Option(None, help="The run folder to write (new or empty; default runs/<method>, numbered if taken)."),
    epochs: int = typer.Option(5, help="Passes over the training images."),
    batch_size: int = typer.Option(256, help="Images per step (SimCLR compares 2× this many views)."),
    train_size: Optional[int] = typer.Option(None, help="Use only the first N training images."),
    lr: float = typer.Option(1e-3, help="Adam learning rate (cosine-decayed to 0)."),
    temperature: Optional[float] = typer.Option(None, help="NT-Xent temperature (default 0.5 SimCLR, 0.2 MoCo)."),
    queue_size: int = typer.Option(4096, help="MoCo: negatives kept in the queue."),
    momentum: float = typer.Option(0.99, help="MoCo: key-encoder momentum."),
    flip: Optional[float] = typer.Option(None, help="Probability of a horizontal flip (default 0.5; 0 for digits, where mirroring changes meaning)."),
    seed: int = typer.Option(0, help="Seed of initialisation, batch order and augmentations."),
    checkpoint_every: int = checkpoint_option(1, "epochs"),
    resume: Optional[Path] = resume_option("metrix selfsup train"),
    nproc: Optional[int] = nproc_option("batch (--batch-size images in all)"),
) -> None:
    """Train an encoder on the training images with labels hidden; the labels are used only by 'selfsup eval'."""
    from metrix.jobs import selfsup as job

    refuse_flags_with_resume(ctx, keep=("resume", "nproc"))

    def work():
        saved = job.train(method, data, root, out, download, epochs, batch_size, train_size, lr, temperature,
                          queue_size, momentum, flip, seed, checkpoint_every, resume, echo=rank_echo)
        rank_echo(f"saved {saved}")

    run_on_processes(nproc, "cpu", work)


@selfsup_app.command("eval")
def selfsup_eval(
    model: Path = typer.Argument(..., metavar="RUN", help="Folder written by 'metrix selfsup train'."),
    data: str = typer.Option("fashion-mnist", help=_SELFSUP_DATA_HELP),
    root: Path = typer.Option(Path("data/fashion_mnist"), help="Folder of the Fashion-MNIST IDX files."),
    download: bool = typer.Option(False, "--download", help="Fetch missing Fashion-MNIST files."),
    k: int = typer.Option(20, help="Neighbours of the kNN vote (cosine)."),
    baselines: bool = typer.Option(False, "--baselines", help="Also score raw pixels and the same encoder untrained."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """kNN accuracy and linear-probe accuracy of the frozen features: test images against the training images."""
    from metrix.jobs import selfsup as job

    rows = job.evaluate(model, data, root, download, k, baselines)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'features':<16}{'kNN acc':>9}{'linear probe':>14}{'dim':>6}")
    for name, r in rows.items():
        typer.echo(f"{name:<16}{r['knn_accuracy']:>9.4f}{r['linear_probe_accuracy']:>14.4f}{r['dim']:>6}")
