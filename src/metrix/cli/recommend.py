"""metrix recommend train / eval / for-user."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from metrix.cli.common import app, checkpoint_option, command_group, refuse_flags_with_resume, resume_option


recommend_app = command_group(help="Metric-learning recommenders (CML, learned-metric ratings) and baselines on MovieLens-100K.")
app.add_typer(recommend_app, name="recommend")


@recommend_app.command("train")
def recommend_train(
    ctx: typer.Context,
    model: str = typer.Option("cml", help="cml, bpr (implicit: ratings >= 4 are positives), metric or mf (explicit ratings)."),
    root: Path = typer.Option(Path("data/ml-100k"), help="Folder of the MovieLens-100K files (u.data, u1.base, ...)."),
    download: bool = typer.Option(False, "--download", help="Fetch ml-100k.zip from GroupLens if files are missing."),
    split: str = typer.Option("u1", help="u1..u5, ua, ub (official) or loo (per-user leave-one-out)."),
    dim: int = typer.Option(64, help="Embedding size."),
    epochs: int = typer.Option(20, help="Training epochs."),
    lr: float = typer.Option(5e-3, help="Adam learning rate."),
    seed: int = typer.Option(0, help="Seed."),
    out: Optional[Path] = typer.Option(None, help="The run folder to write (new or empty; default runs/<model>-<split>, numbered if taken)."),
    checkpoint_every: int = checkpoint_option(1, "epochs"),
    resume: Optional[Path] = resume_option("metrix recommend train"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar over the epochs (on a terminal)."),
) -> None:
    """Train a recommender on a MovieLens-100K split and print its test metrics."""
    from metrix.jobs import recommend as job

    refuse_flags_with_resume(ctx, keep=("resume", "progress"))
    r = job.train(model, root, split, dim, epochs, lr, seed, out, download, checkpoint_every, resume, progress)
    typer.echo("  ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items() if isinstance(v, float)))
    typer.echo(f"saved {r['out']}")


@recommend_app.command("eval")
def recommend_eval(
    model_path: Path = typer.Argument(..., metavar="RUN", help="A run folder written by 'metrix recommend train'."),
    root: Path = typer.Option(Path("data/ml-100k"), help="Folder of the MovieLens-100K files."),
    split: str = typer.Option("u1", help="Split to evaluate on (use the one it was trained on)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Test metrics of a saved recommender: Recall/NDCG/HR@k and coverage, or RMSE/MAE."""
    from metrix.jobs import recommend as job

    metrics = job.evaluate(model_path, root, split)
    typer.echo(json.dumps(metrics, indent=2) if as_json else "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


@recommend_app.command("for-user")
def recommend_for_user(
    model_path: Path = typer.Argument(..., metavar="RUN", help="A run folder of a CML or BPR model written by 'metrix recommend train'."),
    user: int = typer.Option(..., help="MovieLens user id (1-based)."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Number of items."),
    root: Optional[Path] = typer.Option(None, help="MovieLens folder: skip items the user rated in --split, show titles."),
    split: str = typer.Option("u1", help="Split whose training ratings are excluded."),
) -> None:
    """Top-k items for a user: the nearest items in the learned space."""
    from metrix.jobs import recommend as job

    for r in job.for_user(model_path, user, k, root, split):
        typer.echo(f"{r['rank']:>3}  item {r['item']:>5}  score {r['score']:.4f}  {r['title']}")
