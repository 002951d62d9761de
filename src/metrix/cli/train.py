"""metrix train, evaluate, embed, and list: the main job and what it can be built from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from metrix.cli.common import DEVICE, app, nproc_option, open_run, registry_names, run_on_processes


@app.command("list")
def list_entries(kind: str = typer.Argument(..., help="losses, miners, backbones or learners.")) -> None:
    """What exists, one line each: what it needs, its parameters with their defaults, what it is."""
    from metrix.registry import REGISTRIES

    if kind not in REGISTRIES:
        raise ValueError(f"metrix list takes one of {', '.join(REGISTRIES)}, got {kind!r}")
    for entry in REGISTRIES[kind]().values():
        typer.echo(entry.line())


@app.command()
def train(
    data: Optional[str] = typer.Option(None, help="'digits' (bundled, default); fashion-mnist, mnist, omniglot or orl (optionally ':split', read from $METRIX_DATA/<folder>, default data/); an IDX image file; a folder of class sub-folders of images (or a deeper tree: each folder holding images is a class, e.g. alphabet/character); an .npz with X and y; or a .csv with a label column."),
    test_data: Optional[str] = typer.Option(None, help="An official test set (e.g. fashion-mnist:test) instead of a random split of --data."),
    split: Optional[str] = typer.Option(None, help="'samples' (default: test samples of the training classes) or 'classes' (the metric-learning protocol: test and validation classes are never trained on; retrieval among the unseen classes)."),
    loss: Optional[str] = typer.Option(None, help="Loss (default ntxent, supervised contrastive): " + ", ".join(registry_names("losses")) + ". 'metrix list losses' says what each takes."),
    triplets: Optional[str] = typer.Option(None, help="Triplet selection of --loss triplet: all, hard, semihard (default), easy, batch_hard."),
    margin: Optional[float] = typer.Option(None, help="The loss's margin parameter (its default if not given)."),
    temperature: Optional[float] = typer.Option(None, help="The loss's temperature parameter (its default if not given)."),
    loss_param: Optional[List[str]] = typer.Option(None, "--loss-param", metavar="K=V", help="Any parameter of the loss as key=value, repeatable (e.g. --loss-param alpha=2)."),
    miner: Optional[str] = typer.Option(None, help="Pair miner for losses that take one: " + ", ".join(registry_names("miners")) + "."),
    miner_param: Optional[List[str]] = typer.Option(None, "--miner-param", metavar="K=V", help="Any parameter of the miner as key=value, repeatable."),
    backbone: Optional[str] = typer.Option(None, help="Backbone: " + ", ".join(registry_names("backbones")) + " (default mlp; convnet for images; efficientnet_lite0/1/2: ImageNet-pretrained, extra vision), or hf:/path/to/model for a local Hugging Face vision encoder."),
    backbone_param: Optional[List[str]] = typer.Option(None, "--backbone-param", metavar="K=V", help="Any parameter of the backbone as key=value, repeatable (e.g. --backbone-param image_size=128; 'metrix list backbones')."),
    freeze_backbone: Optional[bool] = typer.Option(None, "--freeze-backbone/--train-backbone", help="Freeze the backbone (its BatchNorm statistics too) and train the head only: a linear probe of its features."),
    unfreeze_after: Optional[int] = typer.Option(None, help="With --freeze-backbone: train the backbone too after N epochs."),
    backbone_lr_scale: Optional[float] = typer.Option(None, help="The backbone's learning rate relative to --lr (e.g. 0.1 when fine-tuning a pretrained one; default 1)."),
    freeze_batchnorm: Optional[bool] = typer.Option(None, "--freeze-batchnorm/--train-batchnorm", help="Keep the backbone's BatchNorm statistics as they are while fine-tuning (their scale and shift still learn)."),
    precision: Optional[str] = typer.Option(None, help="The forward pass's precision: fp32 (default), bf16 (CPU or GPU) or fp16 (GPU)."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random crops, flips, rotations, colour jitter, blur and noise on training images (seeded)."),
    embedding_dim: Optional[int] = typer.Option(None, help="Size of the learned embedding (default 64)."),
    head_hidden_dim: Optional[int] = typer.Option(None, help="Make the head an MLP (Linear → BatchNorm → ReLU → Linear) with this many hidden units (default: one linear layer)."),
    model_output: Optional[str] = typer.Option(None, help="What the run embeds with: head (default; the embedding the loss trains) or features (the backbone's output, L2-normalised; the head is then a projection used in training only, as in SupCon: with few training classes it transfers better to unseen ones)."),
    geometry: Optional[str] = typer.Option(None, help="Embedding space: sphere (default; unit vectors, Euclidean distance) or poincare (the Poincaré ball, hyperbolic distance; with a loss on distances: see the geometries in 'metrix list losses')."),
    epochs: Optional[int] = typer.Option(None, help="Number of training epochs (default 40)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate of Adam (default 1e-3)."),
    classes_per_batch: Optional[int] = typer.Option(None, help="Classes in each batch, the P of P×K batches (default 10)."),
    samples_per_class: Optional[int] = typer.Option(None, help="Samples of each class in a batch, the K of P×K batches (default 16)."),
    patience: Optional[int] = typer.Option(None, help="Stop after this many epochs without validation improvement (default: never)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the split, initialisation and batch order (default 0)."),
    label_column: Optional[str] = typer.Option(None, help="Label column of a CSV file (default 'label')."),
    image_size: Optional[Tuple[int, int]] = typer.Option(None, metavar="H W", help="Resize the images of --data (and --test-data) to H×W pixels (antialiased); default: their own size."),
    out: Optional[str] = typer.Option(None, help="The run folder to write (new or empty; default runs/<name>)."),
    name: Optional[str] = typer.Option(None, help="The run's name (default '<data>-<loss>'); without --out the run goes to runs/<name>, numbered if taken."),
    config: Optional[Path] = typer.Option(None, "--config", exists=True, dir_okay=False, help="YAML file of settings; flags given on the command line win."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show a progress bar per epoch."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Write a resumable checkpoint every N epochs into <run>/checkpoints/ (default 1; 0: none). Ctrl-C then says how to resume."),
    device: Optional[str] = typer.Option(None, help="Where the model trains: cpu (default), cuda, cuda:N or mps."),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run (a run folder started with --checkpoint-every) from its last checkpoint, with its own settings; it ends with the weights an uninterrupted run would have."),
    nproc: Optional[int] = nproc_option("batch (of N × --classes-per-batch classes)"),
) -> None:
    """Train an embedding on labelled data and report retrieval before/after.

    With no options: scikit-learn's bundled digits, a stratified 70/30 split, an MLP embedding
    trained with supervised NT-Xent; the test split queries the train split. Writes
    the run folder (--out, default runs/<name>/) with model.safetensors, config.json, metrics.json, history.csv (and plots).
    """
    from metrix.jobs.classical import parse_params
    from metrix.jobs.train import TrainConfig, resume_config, train as run_train

    settings = dict(data=data, test_data=test_data, split=split, loss=loss, triplets=triplets, margin=margin, miner=miner,
                    loss_params=parse_params(loss_param, "--loss-param") or None,
                    miner_params=parse_params(miner_param, "--miner-param") or None,
                    temperature=temperature, backbone=backbone, embedding_dim=embedding_dim, geometry=geometry,
                    head_hidden_dim=head_hidden_dim, model_output=model_output,
                    backbone_params=parse_params(backbone_param, "--backbone-param") or None,
                    freeze_backbone=freeze_backbone, unfreeze_after=unfreeze_after,
                    backbone_lr_scale=backbone_lr_scale, precision=precision, augment=augment,
                    freeze_batchnorm=freeze_batchnorm,
                    epochs=epochs, lr=lr,
                    classes_per_batch=classes_per_batch, samples_per_class=samples_per_class, patience=patience,
                    seed=seed, label_column=label_column, image_size=list(image_size) if image_size else None,
                    out=out, name=name, checkpoint_every=checkpoint_every,
                    device=device)
    if resume is not None:
        given = sorted(f"--{k.replace('_', '-')}" for k, v in settings.items() if v is not None and k != "device")
        if given or config:
            raise ValueError(f"--resume continues a run with its own settings; drop {', '.join(given) or '--config'}")
        cfg = resume_config(resume)
        if progress is not None:
            cfg.progress = progress
    else:
        cfg = TrainConfig.from_sources(str(config) if config else None, progress=progress, **settings)
    run_on_processes(nproc, cfg.device, lambda: run_train(cfg, echo=typer.echo, resume=resume))


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="A run folder written by 'metrix train'."),
    data: Optional[str] = typer.Option(None, help="Dataset to evaluate on (default: the run's own data)."),
    split: str = typer.Option("auto", help="'test': the run's test split against its train split; 'all': every sample against the rest; 'auto': test for the run's own data, else all."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    device: str = DEVICE,
) -> None:
    """Re-evaluate a saved run: precision@1, recall@k, R-precision, MAP@R."""
    from metrix.jobs.train import evaluate as run_evaluate

    metrics = run_evaluate(open_run(run, device), data, split, label_column)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    typer.echo(f"split: {metrics.pop('split')}")
    for key, value in metrics.items():
        typer.echo(f"{key:<16}{value:.4f}" if isinstance(value, float) else f"{key:<16}{value}")


@app.command()
def embed(
    run: Path = typer.Argument(..., help="A run folder written by 'metrix train'."),
    data: str = typer.Option(..., help="Dataset to embed ('digits', a folder, .npz or .csv)."),
    out: Path = typer.Option(..., help="Output .npy file of embeddings (labels go to <out>_labels.npy)."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    device: str = DEVICE,
) -> None:
    """Write the embeddings of a dataset, computed with a saved run, to a .npy file."""
    from metrix.jobs.train import embed as run_embed

    path, dim = run_embed(open_run(run, device), data, out, label_column)
    typer.echo(f"wrote {path} ({dim}-d embeddings)")
