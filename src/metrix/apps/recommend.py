"""Metric-learning recommenders: users and items in one metric space.

- :class:`CML` — Collaborative Metric Learning (Hsieh et al., WWW 2017): a user is pulled toward
  the items they liked and pushed at least a margin away from others, ``[m + d(u,v⁺)² − d(u,v⁻)²]_+``,
  weighted by an estimate of the positive's rank (WARP, ``log(1 + ⌊J·M/U⌋)`` with M of U sampled
  negatives violating the margin), plus a covariance regulariser that de-correlates the
  dimensions; embeddings are clipped to the unit ball after every step. Recommend = nearest items.
- :class:`MetricRatingModel` — explicit ratings ``r̂_ui = μ + b_u + b_i − ||x_u − y_i||²_W`` with a
  learned PSD ``W = LᵀL``.
- Baselines in the same code: :class:`BPR` (Rendle et al. 2009, dot product) and
  :class:`BiasedMF` (``μ + b_u + b_i + p_u·q_i``).

MovieLens-100K loading (official URL; the data itself is never shipped), the official u1–u5 /
ua / ub splits, leave-one-out, and full-ranking metrics (Recall@k, NDCG@k, HR@k, coverage).
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metrix._validation import progress_bar
from metrix.checkpoints import capture, restore
from metrix.training import optimizer_step

MOVIELENS_100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
MOVIELENS_100K_FILES = {  # the data files of the official ml-100k.zip -> SHA-256 (the zip's own is not published)
    "README": "4883b8cf340ed0059971b33f56ad3adc88a40792108ebca3d24aafc4c82e8b52",
    "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb",
    "u.info": "5b0a40b2e47a729ee6203063f6dcf8790c2e63f5a18663e6ee318a72c5f3c27b",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
    "u.occupation": "cd5fbec9afe345d993a62fc7817df1a4a9079c4feb267b3118763b8fd942137d",
    "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
    "u1.base": "ce253ec86c448b44fb3ba9a30d12dcfc2e9210cbde71efada3730c22e9ac212a",
    "u1.test": "18c6014a4b2c7324f250a63f8904a7b16b2b19f911129e346141507b0cbac950",
    "u2.base": "6c06f0b5df4b256da1a994f3ac66edc8da4d3f09bc9282df6b14d893366d703e",
    "u2.test": "4de658d1e04ed9104629509a2e2528fce833ac8e048280183f1df167632038c3",
    "u3.base": "afdc155c291c6edc41c0407e39d7462eb98d341e064f0b0a12175b80b3c4af5d",
    "u3.test": "0f548b51c78327de4c156461d3e430b7e5579fe2b5681586a59416e48fd35f6d",
    "u4.base": "219f0f4d40dfe9c5141d425f53fa91ee23ed275f14e280bbf1b50117afb064ca",
    "u4.test": "7c02ad0a1e7ab1083c8b9d4b627203a051dd7b5eab46d99fa44de33470de8db9",
    "u5.base": "a9574e59ce961eec2121627760b6e9b0974ce1637b3fe69ac32cb14a4bfab485",
    "u5.test": "351cc52e0d15b6c721466276fc24671d40936899e3d01fadeaf312915b8c5634",
    "ua.base": "67b5bcdb380c29f85d56a012ecd88612ae020f30a6730d117a334ee8203b91f2",
    "ua.test": "d0497e202417720f57a184ec8c66be2d1afa4ff41bb53787c57b28d6bf79bc42",
    "ub.base": "237254d253b6ad7de84f919d041055428646254f34ed8f562703c899430cd881",
    "ub.test": "d54a72d05730d5892062734b2bec73e976f9b713d18c828a18b968d6cce442da",
}
MOVIELENS_100K_SHAPE = (943, 1682)


@dataclass
class Interactions:
    """(user, item, rating, timestamp) rows with 0-based ids and the id ranges."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    n_users: int
    n_items: int

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, mask) -> "Interactions":
        return Interactions(self.users[mask], self.items[mask], self.ratings[mask], self.timestamps[mask],
                            self.n_users, self.n_items)

    def positives(self, min_rating: float = 4.0) -> "Interactions":
        """Implicit feedback: the interactions rated at least ``min_rating``."""
        return self.subset(self.ratings >= min_rating)


def _read_ratings(path: Path, shape=MOVIELENS_100K_SHAPE) -> Interactions:
    raw = np.loadtxt(path, dtype=np.int64, ndmin=2)
    if raw.shape[1] != 4:
        raise ValueError(f"{path}: expected 'user item rating timestamp' rows, got {raw.shape[1]} columns")
    users, items = raw[:, 0] - 1, raw[:, 1] - 1
    if users.min() < 0 or items.min() < 0 or users.max() >= shape[0] or items.max() >= shape[1]:
        raise ValueError(f"{path}: ids outside 1..{shape[0]} users / 1..{shape[1]} items")
    return Interactions(users, items, raw[:, 2].astype(np.float32), raw[:, 3], *shape)


def _ensure_movielens(root: Path, name: str, download_missing: bool) -> Path:
    path = root / name
    if path.is_file():
        return path
    if not download_missing:
        raise FileNotFoundError(f"{path} is missing (fetch {MOVIELENS_100K_URL} with --download; download_missing=True in Python)")
    from metrix.datasets import archive_member_name, extract_pinned, fetch_archive

    data = fetch_archive(MOVIELENS_100K_URL)
    members = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for member in archive.namelist():
            name = archive_member_name(member, prefix="ml-100k/")  # refuses ../ and absolute paths (zip-slip)
            if name in MOVIELENS_100K_FILES:
                members[name] = archive.read(member)
    extract_pinned(members, root, MOVIELENS_100K_FILES)
    return path


def load_movielens_100k(root, split: str | None = None, download_missing: bool = False):
    """All ratings (``split=None``), or ``(train, test)`` of an official split 'u1'–'u5', 'ua', 'ub'."""
    root = Path(root)
    if split is None:
        return _read_ratings(_ensure_movielens(root, "u.data", download_missing))
    if split not in {"u1", "u2", "u3", "u4", "u5", "ua", "ub"}:
        raise ValueError(f"split must be one of u1..u5, ua, ub, got {split!r}")
    return tuple(_read_ratings(_ensure_movielens(root, f"{split}.{part}", download_missing)) for part in ("base", "test"))


def leave_one_out(data: Interactions) -> tuple[Interactions, Interactions]:
    """Per user, the latest interaction (ties: the later row) is the test item; users with one
    interaction keep it for training."""
    order = np.lexsort((np.arange(len(data)), data.timestamps, data.users))
    last = np.zeros(len(data), bool)
    users_sorted = data.users[order]
    is_last = np.r_[users_sorted[1:] != users_sorted[:-1], True]
    counts = np.bincount(data.users, minlength=data.n_users)
    last[order[is_last]] = counts[users_sorted[is_last]] > 1
    return data.subset(~last), data.subset(last)


# --- models ----------------------------------------------------------------------------------


def _init_embedding(n, dim, scale, generator):
    return nn.Parameter(torch.randn(n, dim, generator=generator) * scale)


class CML(nn.Module):
    """Collaborative Metric Learning (implicit feedback).

    Parameters
    ----------
    n_users, n_items, dim : sizes
    margin : hinge margin m (paper: 0.5 or tuned)
    cov_weight : weight of the covariance regulariser (λ_c)
    use_rank_weight : WARP-style rank weights (paper: yes)
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 64, margin: float = 0.5, cov_weight: float = 1.0,
                 use_rank_weight: bool = True, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.users = _init_embedding(n_users, dim, 1 / math.sqrt(dim), g)
        self.items = _init_embedding(n_items, dim, 1 / math.sqrt(dim), g)
        self.margin, self.cov_weight, self.use_rank_weight = float(margin), float(cov_weight), bool(use_rank_weight)
        self.clip_()

    def implicit_loss(self, users, positives, negatives):
        """``negatives`` has shape (B, U): U sampled items per (user, positive) pair."""
        u, p, n = self.users[users], self.items[positives], self.items[negatives]
        d_pos = ((u - p) ** 2).sum(1)  # B
        d_neg = ((u[:, None, :] - n) ** 2).sum(2)  # B × U
        hinge = (self.margin + d_pos[:, None] - d_neg).clamp(min=0.0)
        # the paper's TF code keeps the closest sampled negative for each pair
        closest = hinge.max(1).values
        if self.use_rank_weight:
            violating = (hinge > 0).sum(1).float()
            rank = torch.floor(violating * self.items.shape[0] / negatives.shape[1])
            closest = closest * torch.log1p(rank)
        loss = closest.mean()
        if self.cov_weight:
            loss = loss + self.cov_weight * covariance_penalty(torch.cat([u, p]))
        return loss

    @torch.no_grad()
    def clip_(self):
        """Keep every embedding inside the unit ball (the paper's ``clip_by_norm``)."""
        for table in (self.users, self.items):
            norm = table.norm(dim=1, keepdim=True)
            table.mul_(torch.where(norm > 1.0, 1.0 / norm, torch.ones_like(norm)))

    after_step = clip_

    @torch.no_grad()
    def scores(self, users) -> torch.Tensor:
        """Higher = recommend: minus the squared distance to every item."""
        return -torch.cdist(self.users[users], self.items) ** 2


def covariance_penalty(x: torch.Tensor) -> torch.Tensor:
    """Hsieh et al.'s de-correlation loss: (‖C‖_F − ‖diag C‖²) / N for the covariance C of the batch."""
    centred = x - x.mean(0)
    C = centred.T @ centred / len(x)
    return (torch.linalg.matrix_norm(C) - (torch.diagonal(C) ** 2).sum()) / len(x)


class BPR(nn.Module):
    """Bayesian Personalised Ranking with a dot-product model and item biases (Rendle et al. 2009)."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.users = _init_embedding(n_users, dim, 0.1, g)
        self.items = _init_embedding(n_items, dim, 0.1, g)
        self.item_bias = nn.Parameter(torch.zeros(n_items))

    def _score(self, u, i):
        return (self.users[u][:, None, :] * self.items[i]).sum(-1) + self.item_bias[i]

    def implicit_loss(self, users, positives, negatives):
        s_pos = self._score(users, positives[:, None])  # B × 1
        s_neg = self._score(users, negatives)  # B × U
        return nn.functional.softplus(s_neg - s_pos).mean()  # −log σ(s⁺ − s⁻)

    def after_step(self):
        pass

    @torch.no_grad()
    def scores(self, users) -> torch.Tensor:
        return self.users[users] @ self.items.T + self.item_bias


class _BiasedRatingModel(nn.Module):
    """``μ + b_u + b_i`` plus an interaction term of the user and item embeddings (subclasses)."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, global_mean: float = 3.5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mu = nn.Parameter(torch.tensor(float(global_mean)))
        self.user_bias, self.item_bias = nn.Parameter(torch.zeros(n_users)), nn.Parameter(torch.zeros(n_items))
        self.users = _init_embedding(n_users, dim, 0.1, g)
        self.items = _init_embedding(n_items, dim, 0.1, g)

    def forward(self, users, items):
        return self.mu + self.user_bias[users] + self.item_bias[items] + self.interaction(users, items)


class MetricRatingModel(_BiasedRatingModel):
    """Explicit ratings ``μ + b_u + b_i − ||L(x_u − y_i)||²`` (the metric ``W = LᵀL`` is learned)."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, global_mean: float = 3.5, seed: int = 0):
        super().__init__(n_users, n_items, dim, global_mean, seed)
        self.L = nn.Parameter(torch.eye(dim))

    def interaction(self, users, items):
        diff = (self.users[users] - self.items[items]) @ self.L.T
        return -(diff * diff).sum(1)

    def metric(self) -> torch.Tensor:
        """The learned PSD matrix ``W = LᵀL``."""
        return self.L.T @ self.L


class BiasedMF(_BiasedRatingModel):
    """Biased matrix factorisation ``μ + b_u + b_i + p_u·q_i`` (Koren et al. 2009)."""

    def interaction(self, users, items):
        return (self.users[users] * self.items[items]).sum(1)


# --- training ---------------------------------------------------------------------------------


def _train_epochs(model, n: int, epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int,
                  batch_step, checkpoint=None, resume: bool = False, progress: str | None = None) -> list[float]:
    """Adam over shuffled mini-batches of ``n`` interactions; the per-epoch mean of ``batch_step``'s sums.

    ``batch_step(idx, opt, g)`` takes one optimiser step on the rows ``idx`` (drawing any randomness from ``g``)
    and returns the batch's summed loss. ``checkpoint`` (a :class:`metrix.checkpoints.LoopCheckpoint`) saves
    the weights, optimiser, generator and losses after every ``checkpoint.every`` epochs; ``resume=True``
    continues from its last one to the weights an uninterrupted run ends with.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history, done = [], 0
    objects = {"model": model, "optimizer": opt}
    saved = restore(checkpoint, objects) if resume else None
    if saved is not None:
        done, history = saved[0], list(saved[2]["history"])
        g.set_state(saved[1]["generator"])
    bar = progress_bar(epochs, progress, "epoch")
    bar.update(done)
    for epoch in range(done + 1, epochs + 1):
        total = 0.0
        for idx in torch.randperm(n, generator=g).split(batch_size):
            total += batch_step(idx, opt, g)
        history.append(total / n)
        if checkpoint is not None and checkpoint.due(epoch, epochs):
            capture(checkpoint, epoch, objects, {"history": history}, generator=g.get_state())
        bar.update(1)
    bar.close()
    return history


def fit_implicit(model, train: Interactions, epochs: int = 30, batch_size: int = 1024, lr: float = 1e-3,
                 n_negatives: int = 20, weight_decay: float = 0.0, seed: int = 0, **resumable) -> list[float]:
    """Train CML or BPR on (user, item) positives with uniformly sampled negatives
    (re-drawn when a sample is itself a positive of the user). ``resumable``: ``checkpoint``, ``resume`` and
    ``progress`` of :func:`_train_epochs`."""
    if len(train) == 0:
        raise ValueError("no training interactions")
    known = torch.zeros(train.n_users, train.n_items, dtype=torch.bool)
    known[torch.from_numpy(train.users), torch.from_numpy(train.items)] = True
    users, items = torch.from_numpy(train.users), torch.from_numpy(train.items)

    def batch_step(idx, opt, g):
        u, p = users[idx], items[idx]
        neg = torch.randint(0, train.n_items, (len(idx), n_negatives), generator=g)
        for _retry in range(3):  # rejection sampling of accidental positives
            clash = known[u[:, None], neg]
            if not clash.any():
                break
            neg[clash] = torch.randint(0, train.n_items, (int(clash.sum()),), generator=g)
        value = optimizer_step(model.implicit_loss(u, p, neg), opt) * len(idx)
        model.after_step()
        return value

    return _train_epochs(model, len(users), epochs, batch_size, lr, weight_decay, seed, batch_step, **resumable)


def fit_explicit(model, train: Interactions, epochs: int = 30, batch_size: int = 1024, lr: float = 1e-2,
                 weight_decay: float = 0.0, l2: float = 0.05, seed: int = 0, **resumable) -> list[float]:
    """Train a rating model with squared error plus ``l2``·(squared norms of the rows used); ``resumable`` as
    for :func:`fit_implicit`."""
    users, items = torch.from_numpy(train.users), torch.from_numpy(train.items)
    ratings = torch.from_numpy(train.ratings)

    def batch_step(idx, opt, g):
        u, i = users[idx], items[idx]
        err = model(u, i) - ratings[idx]
        reg = (model.users[u] ** 2).sum(1) + (model.items[i] ** 2).sum(1) + model.user_bias[u] ** 2 + model.item_bias[i] ** 2
        optimizer_step((err * err).mean() + l2 * reg.mean(), opt)
        return float((err.detach() ** 2).sum())

    return _train_epochs(model, len(users), epochs, batch_size, lr, weight_decay, seed, batch_step, **resumable)


# --- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def ranking_metrics(model, train: Interactions, test: Interactions, ks=(10, 50), batch_users: int = 512) -> dict:
    """Full-ranking top-k metrics over every item not in the user's training data.

    Recall@k = hits / #test items of the user; NDCG@k with binary relevance; HR@k = at least
    one hit; coverage@k = distinct items in all top-k lists / catalogue size. Averaged over
    users with test items.
    """
    ks = sorted(ks)
    test_users = np.unique(test.users)
    if len(test_users) == 0:
        raise ValueError("no test interactions")
    seen = torch.zeros(train.n_users, train.n_items, dtype=torch.bool)
    seen[torch.from_numpy(train.users), torch.from_numpy(train.items)] = True
    relevant = torch.zeros(train.n_users, train.n_items, dtype=torch.bool)
    relevant[torch.from_numpy(test.users), torch.from_numpy(test.items)] = True
    kmax = max(ks)
    out = {f"recall@{k}": 0.0 for k in ks} | {f"ndcg@{k}": 0.0 for k in ks} | {f"hr@{k}": 0.0 for k in ks}
    shown = {k: torch.zeros(train.n_items, dtype=torch.bool) for k in ks}
    discounts = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64))
    for start in range(0, len(test_users), batch_users):
        u = torch.from_numpy(test_users[start : start + batch_users])
        scores = model.scores(u).double()
        scores[seen[u]] = -torch.inf
        top = scores.topk(kmax, dim=1).indices
        hits = torch.gather(relevant[u], 1, top).double()
        n_rel = relevant[u].sum(1).double()
        for k in ks:
            h = hits[:, :k]
            out[f"recall@{k}"] += float((h.sum(1) / n_rel).sum())
            out[f"hr@{k}"] += float((h.sum(1) > 0).double().sum())
            ideal = torch.cumsum(discounts[:k], 0)[(n_rel.clamp(max=k) - 1).long()]
            out[f"ndcg@{k}"] += float(((h * discounts[:k]).sum(1) / ideal).sum())
            shown[k][top[:, :k].ravel()] = True
    out = {key: value / len(test_users) for key, value in out.items()}
    for k in ks:
        out[f"coverage@{k}"] = float(shown[k].double().mean())
    out["num_users"] = int(len(test_users))
    return out


@torch.no_grad()
def rating_metrics(model, test: Interactions) -> dict:
    """RMSE and MAE of predictions clipped to the 1–5 scale."""
    pred = model(torch.from_numpy(test.users), torch.from_numpy(test.items)).clamp(1.0, 5.0).double()
    err = pred - torch.from_numpy(test.ratings).double()
    return {"rmse": float(err.pow(2).mean().sqrt()), "mae": float(err.abs().mean())}


# --- persistence and jobs ---------------------------------------------------------------------

MODELS = {"cml": CML, "bpr": BPR, "metric": MetricRatingModel, "mf": BiasedMF}
IMPLICIT = {"cml", "bpr"}


def save_recommender(model: nn.Module, path, extra: dict | None = None) -> Path:
    """Weights as safetensors and the constructor arguments as JSON (checksummed, atomic)."""
    from metrix.io import save_tagged

    kind = next((k for k, cls in MODELS.items() if type(model) is cls), None)
    if kind is None:
        raise TypeError(f"cannot save {type(model).__name__}")
    config = {"kind": kind, "n_users": model.users.shape[0], "n_items": model.items.shape[0], "dim": model.users.shape[1]}
    if kind == "cml":
        config.update(margin=model.margin, cov_weight=model.cov_weight, use_rank_weight=model.use_rank_weight)
    return save_tagged(path, dict(model.state_dict()), "metrix_recommender", {"model": config, "extra": extra or {}})


def load_recommender(path):
    """Inverse of :func:`save_recommender`; returns ``(model, extra)``."""
    from metrix.io import CorruptFileError, load_tagged

    from metrix.io import build_to_fit, reading

    tensors, info = load_tagged(path, "metrix_recommender", "recommender")
    with reading(path, "recommender"):
        config = dict(info["model"])
        cls = MODELS.get(config.pop("kind"))
        if cls is None:
            raise CorruptFileError(f"{path}: unknown recommender kind")
        extra = dict(info["extra"])
    model = build_to_fit(lambda: cls(**config), tensors, path, "recommender")  # sizes checked before allocating
    return model.eval(), extra
