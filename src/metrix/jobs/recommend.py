"""What ``metrix recommend train / eval / for-user`` do: metric-learning recommenders on MovieLens-100K."""

from __future__ import annotations

from pathlib import Path

import torch

from metrix.apps import recommend as rec
from metrix.checkpoints import CHECKPOINTS, LoopCheckpoint, interrupted, start_or_resume
from metrix.runs import MODEL_FILE, model_file


def movielens_split(root, split: str, download: bool = False):
    """``(train, test)`` interactions of an official split (u1..u5, ua, ub) or per-user leave-one-out (loo)."""
    if split == "loo":
        return rec.leave_one_out(rec.load_movielens_100k(root, download_missing=download))
    return rec.load_movielens_100k(root, split, download_missing=download)


def _test_metrics(net, train, test, split: str) -> dict:
    if isinstance(net, (rec.CML, rec.BPR)):  # implicit models: ratings >= 4 are the positives
        if split != "loo":
            train, test = train.positives(), test.positives()
        return rec.ranking_metrics(net, train, test)
    return rec.rating_metrics(net, test)


COMMAND = "metrix recommend train"


def train(model: str = "cml", root="data/ml-100k", split: str = "u1", dim: int = 64, epochs: int = 20,
          lr: float = 5e-3, seed: int = 0, out=None, download: bool = False, checkpoint_every: int = 1,
          resume=None, progress: bool = False) -> dict:
    """Train ``model`` (cml, bpr, metric, mf) on a split and save it into the run folder ``out`` (default
    ``runs/<model>-<split>``); returns its test metrics and the folder. A checkpoint is written every
    ``checkpoint_every`` epochs; ``resume`` (an interrupted run folder) continues it with its own settings."""
    if model not in rec.MODELS:
        raise ValueError(f"model must be one of {sorted(rec.MODELS)}, got {model!r}")
    settings = dict(model=model, root=str(root), split=split, dim=int(dim), epochs=int(epochs), lr=float(lr),
                    seed=int(seed), download=download, checkpoint_every=int(checkpoint_every))
    run_dir, s, resuming = start_or_resume(COMMAND, out, f"{model}-{split}", settings, resume)
    model, split, seed = s["model"], s["split"], s["seed"]
    train_set, test_set = movielens_split(s["root"], split, s["download"])
    ckpt = LoopCheckpoint(run_dir / CHECKPOINTS, s["checkpoint_every"])
    resumable = dict(checkpoint=ckpt, resume=resuming, progress="training" if progress else None)
    try:
        if model in rec.IMPLICIT:
            fit_set = train_set if split == "loo" else train_set.positives()
            net = rec.MODELS[model](fit_set.n_users, fit_set.n_items, s["dim"], seed=seed)
            rec.fit_implicit(net, fit_set, epochs=s["epochs"], lr=s["lr"], seed=seed, **resumable)
        else:
            net = rec.MODELS[model](train_set.n_users, train_set.n_items, s["dim"], float(train_set.ratings.mean()), seed)
            rec.fit_explicit(net, train_set, epochs=s["epochs"], lr=s["lr"], seed=seed, **resumable)
    except KeyboardInterrupt:
        raise interrupted(run_dir, ckpt, "epoch", s["epochs"], COMMAND) from None
    metrics = _test_metrics(net, train_set, test_set, split)
    rec.save_recommender(net, run_dir / MODEL_FILE, extra={"split": split, "metrics": metrics})
    return {"metrics": metrics, "out": run_dir}


def evaluate(model_path, root, split: str = "u1") -> dict:
    """Test metrics of a saved recommender: Recall/NDCG/HR@k and coverage, or RMSE/MAE."""
    net, _ = rec.load_recommender(model_file(model_path, "metrix recommend train"))
    train_set, test_set = movielens_split(root, split)
    return _test_metrics(net, train_set, test_set, split)


def for_user(model_path, user: int, k: int = 10, root=None, split: str = "u1") -> list[dict]:
    """The ``k`` nearest items of ``user`` (1-based MovieLens id) in the learned space, without the items the
    user rated in ``split``'s training part when ``root`` is given; titles from ``root/u.item``."""
    net, _ = rec.load_recommender(model_file(model_path, "metrix recommend train"))
    if not isinstance(net, (rec.CML, rec.BPR)):
        raise ValueError("for-user needs a ranking model (cml or bpr)")
    if not 1 <= int(user) <= net.users.shape[0]:
        raise ValueError(f"user must be in 1..{net.users.shape[0]}")
    scores = net.scores(torch.tensor([int(user) - 1]))[0]
    titles = {}
    if root is not None:
        train_set, _ = movielens_split(root, split)
        scores[torch.from_numpy(train_set.items[train_set.users == int(user) - 1])] = -torch.inf
        item_file = Path(root) / "u.item"
        if item_file.is_file():
            for line in item_file.read_text(encoding="latin-1").splitlines():
                parts = line.split("|")
                titles[int(parts[0]) - 1] = parts[1]
    top = scores.topk(min(int(k), len(scores)))
    return [{"rank": rank, "item": i + 1, "score": s, "title": titles.get(i, "")}
            for rank, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1)]
