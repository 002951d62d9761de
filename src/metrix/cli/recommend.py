"""metrix recommend train / eval / for-user."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from metrix.cli.common import app, command_group


recommend_app = command_group(help="Metric-learning recommenders (CML, learned-metric ratings) and baselines on MovieLens-100K.")
app.add_typer(recommend_app, name="recommend")


def _movielens(root: Path, split: str, download: bool):
    from metrix.apps.recommend import leave_one_out, load_movielens_100k

    if split == "loo":
        return leave_one_out(load_movielens_100k(root, download_missing=download))
    return load_movielens_100k(root, split, download_missing=download)


@recommend_app.command("train")
def recommend_train(
    model: str = typer.Option("cml", help="cml, bpr (implicit: ratings >= 4 are positives), metric or mf (explicit ratings)."),
    root: Path = typer.Option(Path("data/ml-100k"), help="Folder of the MovieLens-100K files (u.data, u1.base, ...)."),
    download: bool = typer.Option(False, "--download", help="Fetch ml-100k.zip from GroupLens if files are missing."),
    split: str = typer.Option("u1", help="u1..u5, ua, ub (official) or loo (per-user leave-one-out)."),
    dim: int = typer.Option(64, help="Embedding size."),
    epochs: int = typer.Option(20, help="Training epochs."),
    lr: float = typer.Option(5e-3, help="Adam learning rate."),
    seed: int = typer.Option(0, help="Seed."),
    out: Path = typer.Option(Path("runs/recommender.safetensors"), help="Where to save the model."),
) -> None:
    """Train a recommender on a MovieLens-100K split and print its test metrics."""
    from metrix.apps import recommend as rec

    if model not in rec.MODELS:
        raise ValueError(f"model must be one of {sorted(rec.MODELS)}, got {model!r}")
    train, test = _movielens(root, split, download)
    if model in rec.IMPLICIT:
        train, test = (train, test) if split == "loo" else (train.positives(), test.positives())
        net = rec.MODELS[model](train.n_users, train.n_items, dim, seed=seed)
        rec.fit_implicit(net, train, epochs=epochs, lr=lr, seed=seed)
        metrics = rec.ranking_metrics(net, train, test)
    else:
        net = rec.MODELS[model](train.n_users, train.n_items, dim, float(train.ratings.mean()), seed)
        rec.fit_explicit(net, train, epochs=epochs, lr=lr, seed=seed)
        metrics = rec.rating_metrics(net, test)
    rec.save_recommender(net, out, extra={"split": split, "metrics": metrics})
    typer.echo("  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    typer.echo(f"saved {out}")


@recommend_app.command("eval")
def recommend_eval(
    model_path: Path = typer.Argument(..., help="Model saved by 'metrix recommend train'."),
    root: Path = typer.Option(Path("data/ml-100k"), help="Folder of the MovieLens-100K files."),
    split: str = typer.Option("u1", help="Split to evaluate on (use the one it was trained on)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Test metrics of a saved recommender: Recall/NDCG/HR@k and coverage, or RMSE/MAE."""
    from metrix.apps import recommend as rec

    net, _ = rec.load_recommender(model_path)
    train, test = _movielens(root, split, False)
    implicit = isinstance(net, (rec.CML, rec.BPR))
    if implicit and split != "loo":
        train, test = train.positives(), test.positives()
    metrics = rec.ranking_metrics(net, train, test) if implicit else rec.rating_metrics(net, test)
    typer.echo(json.dumps(metrics, indent=2) if as_json else "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


@recommend_app.command("for-user")
def recommend_for_user(
    model_path: Path = typer.Argument(..., help="A CML or BPR model saved by 'metrix recommend train'."),
    user: int = typer.Option(..., help="MovieLens user id (1-based)."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Number of items."),
    root: Optional[Path] = typer.Option(None, help="MovieLens folder: skip items the user rated in --split, show titles."),
    split: str = typer.Option("u1", help="Split whose training ratings are excluded."),
) -> None:
    """Top-k items for a user: the nearest items in the learned space."""
    import torch

    from metrix.apps import recommend as rec

    net, _ = rec.load_recommender(model_path)
    if not isinstance(net, (rec.CML, rec.BPR)):
        raise ValueError("for-user needs a ranking model (cml or bpr)")
    if not 1 <= user <= net.users.shape[0]:
        raise ValueError(f"user must be in 1..{net.users.shape[0]}")
    scores = net.scores(torch.tensor([user - 1]))[0]
    titles = {}
    if root is not None:
        train, _ = _movielens(root, split, False)
        scores[torch.from_numpy(train.items[train.users == user - 1])] = -torch.inf
        item_file = Path(root) / "u.item"
        if item_file.is_file():
            for line in item_file.read_text(encoding="latin-1").splitlines():
                parts = line.split("|")
                titles[int(parts[0]) - 1] = parts[1]
    top = scores.topk(min(k, len(scores)))
    for rank, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        typer.echo(f"{rank:>3}  item {i + 1:>5}  score {s:.4f}  {titles.get(i, '')}")
