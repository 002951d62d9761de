"""metrix fit-linear / transform-linear: classical (Mahalanobis) metric learning."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from metrix.cli.common import app


@app.command("fit-linear")
def fit_linear(
    algorithm: str = typer.Argument(..., help="Covariance, NCA, LMNN, ITML, MMC, LFDA, FDA, RCA or MLKR (any case)."),
    data: str = typer.Option("digits", help="'digits' (bundled), a folder of class sub-folders of images, an .npz with X and y, or a .csv."),
    out: Optional[Path] = typer.Option(None, help="The run folder to write (new or empty; default runs/<data>-<algorithm>, numbered if taken)."),
    n_components: Optional[int] = typer.Option(None, help="Output dimension (default: the learner's own)."),
    param: Optional[List[str]] = typer.Option(None, "--param", help="Hyper-parameter as key=value, repeatable (e.g. --param n_neighbors=5)."),
    seed: int = typer.Option(0, help="Seed of the split and of the learner."),
    k: int = typer.Option(3, "-k", "--k", min=1, help="Neighbours of the k-NN classifier used to report accuracy."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
) -> None:
    """Learn a linear (Mahalanobis) metric and report k-NN accuracy before and after.

    Standardises on a stratified 70/30 split, fits on the train part, classifies the test part
    with k-NN in the standardised and in the learned space, and saves the learner (safetensors,
    standardisation included) for 'metrix transform-linear'.
    """
    from metrix.jobs.classical import fit_linear as run_fit, parse_params

    run_fit(algorithm, data, out, n_components, parse_params(param), seed, k, label_column, echo=typer.echo)


@app.command("transform-linear")
def transform_linear(
    model: Path = typer.Argument(..., metavar="RUN", help="A run folder written by 'metrix fit-linear'."),
    data: str = typer.Option(..., help="Data to map: 'digits', a folder, .npz or .csv (raw features)."),
    out: Path = typer.Option(..., help="Output .npz with 'embeddings' and 'labels'."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
) -> None:
    """Map data into the space of a saved linear metric (Euclidean distance there = learned distance)."""
    from metrix.jobs.classical import transform_linear as run_transform

    path, dim = run_transform(model, data, out, label_column)
    typer.echo(f"wrote {path} ({dim}-d)")
