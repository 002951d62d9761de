"""metrix fewshot train / eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from metrix.cli.common import app, checkpoint_option, command_group, refuse_flags_with_resume, resume_option


fewshot_app = command_group(help="Prototypical networks: episodic training and N-way K-shot evaluation.")
app.add_typer(fewshot_app, name="fewshot")

DATA_HELP = ("'omniglot-background' / 'omniglot-evaluation' (the official zips in --root; --download fetches them), "
             "or a dataset of images: a folder of class sub-folders or an .npz with X (n, 1, H, W) and y.")


@fewshot_app.command("train")
def fewshot_train(
    ctx: typer.Context,
    data: str = typer.Option("omniglot-background", help=DATA_HELP),
    out: Optional[Path] = typer.Option(None, help="The run folder to write (new or empty; default runs/protonet, numbered if taken)."),
    root: Path = typer.Option(Path("data/omniglot"), help="Folder of the Omniglot zips."),
    download: bool = typer.Option(False, "--download", help="Fetch missing Omniglot zips from the official repository."),
    rotations: bool = typer.Option(True, "--rotations/--no-rotations", help="Add 90/180/270-degree rotations as new classes (Snell et al.)."),
    episodes: int = typer.Option(1500, help="Training episodes."),
    n_way: int = typer.Option(20, help="Classes per training episode."),
    k_shot: int = typer.Option(5, help="Support samples per class."),
    n_query: int = typer.Option(5, help="Query samples per class."),
    lr: float = typer.Option(1e-3, help="Adam learning rate (halved every third of the episodes)."),
    seed: int = typer.Option(0, help="Seed of the episodes and the initialisation."),
    checkpoint_every: int = checkpoint_option(100, "episodes"),
    resume: Optional[Path] = resume_option("metrix fewshot train"),
) -> None:
    """Train a prototypical network (4-block conv net) with N-way K-shot episodes."""
    from metrix.jobs import fewshot as job

    refuse_flags_with_resume(ctx)
    saved = job.train(data, out, root, download, rotations, episodes, n_way, k_shot, n_query, lr, seed,
                      checkpoint_every, resume, echo=typer.echo)
    typer.echo(f"saved {saved}")


@fewshot_app.command("eval")
def fewshot_eval(
    model: Path = typer.Argument(..., metavar="RUN", help="A run folder written by 'metrix fewshot train'."),
    data: str = typer.Option("omniglot-evaluation", help=DATA_HELP),
    root: Path = typer.Option(Path("data/omniglot"), help="Folder of the Omniglot zips."),
    download: bool = typer.Option(False, "--download", help="Fetch missing Omniglot zips."),
    n_way: int = typer.Option(5, help="Classes per test episode."),
    k_shot: int = typer.Option(1, help="Support samples per class."),
    n_query: int = typer.Option(15, help="Query samples per class."),
    episodes: int = typer.Option(1000, help="Test episodes."),
    seed: int = typer.Option(0, help="Seed of the episodes."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Mean N-way K-shot accuracy with its 95% confidence interval on classes never trained on."""
    from metrix.jobs import fewshot as job

    r = job.evaluate(model, data, root, download, n_way, k_shot, n_query, episodes, seed)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    typer.echo(f"{n_way}-way {k_shot}-shot: accuracy {r['accuracy']:.4f} ± {r['ci95']:.4f} (95% CI, {episodes} episodes)")
