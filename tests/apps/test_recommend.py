"""Recommenders: data handling, metrics against brute force, models learn a planted structure."""

import numpy as np
import pytest
import torch

from metrix.apps.recommend import (
    BPR, CML, BiasedMF, Interactions, MetricRatingModel, covariance_penalty, fit_explicit, fit_implicit,
    leave_one_out, load_movielens_100k, ranking_metrics, rating_metrics,
)
from tests.conftest import SHARED_DATA


def planted(n_users=60, n_items=80, groups=4, seed=0):
    """Users like the items of their group: a structure any recommender should find."""
    rng = np.random.default_rng(seed)
    ug, ig = rng.integers(0, groups, n_users), rng.integers(0, groups, n_items)
    rows = [(u, i) for u in range(n_users) for i in range(n_items) if ug[u] == ig[i] and rng.random() < 0.6]
    u, i = np.array(rows).T
    ratings = np.where(rng.random(len(u)) < 0.8, 5, 4).astype(np.float32)
    data = Interactions(u, i, ratings, rng.permutation(len(u)), n_users, n_items)
    return data


def test_leave_one_out_holds_the_latest_item():
    d = Interactions(np.array([0, 0, 0, 1, 2, 2]), np.array([1, 2, 3, 1, 4, 5]), np.ones(6, np.float32),
                     np.array([5, 9, 1, 3, 2, 2]), 3, 6)
    train, test = leave_one_out(d)
    assert sorted(zip(test.users.tolist(), test.items.tolist())) == [(0, 2), (2, 5)]  # tie: later row
    assert len(train) == 4 and 1 in train.users  # a user with one interaction keeps it


def test_ranking_metrics_brute_force():
    class Fixed:
        def __init__(self, s):
            self.s = torch.as_tensor(s)

        def scores(self, users):
            return self.s[users]

    rng = np.random.default_rng(1)
    S = rng.normal(size=(5, 12))
    train = Interactions(np.array([0, 1, 2]), np.array([0, 1, 2]), np.ones(3, np.float32), np.zeros(3), 5, 12)
    tu, ti = np.array([0, 0, 1, 3, 3, 3]), np.array([3, 5, 7, 0, 1, 2])
    test = Interactions(tu, ti, np.ones(6, np.float32), np.zeros(6), 5, 12)
    m = ranking_metrics(Fixed(S), train, test, ks=(2, 4))
    rec, ndcg, hr, shown = {2: [], 4: []}, {2: [], 4: []}, {2: [], 4: []}, {2: set(), 4: set()}
    for u in (0, 1, 3):
        s = S[u].copy()
        s[train.items[train.users == u]] = -np.inf
        order = list(np.argsort(-s, kind="stable"))
        rel = set(ti[tu == u].tolist())
        for k in (2, 4):
            top = order[:k]
            shown[k] |= set(top)
            h = [1.0 if i in rel else 0.0 for i in top]
            rec[k].append(sum(h) / len(rel))
            hr[k].append(float(sum(h) > 0))
            dcg = sum(x / np.log2(r + 2) for r, x in enumerate(h))
            ndcg[k].append(dcg / sum(1 / np.log2(r + 2) for r in range(min(len(rel), k))))
    for k in (2, 4):
        assert m[f"recall@{k}"] == pytest.approx(np.mean(rec[k]))
        assert m[f"ndcg@{k}"] == pytest.approx(np.mean(ndcg[k]))
        assert m[f"hr@{k}"] == pytest.approx(np.mean(hr[k]))
        assert m[f"coverage@{k}"] == pytest.approx(len(shown[k]) / 12)


def test_covariance_penalty_definition():
    x = torch.randn(50, 4, dtype=torch.float64)
    c = torch.cov(x.T, correction=0)
    assert covariance_penalty(x).item() == pytest.approx((torch.linalg.norm(c) - (c.diagonal() ** 2).sum()).item() / 50)


@pytest.mark.parametrize("make", [lambda: CML(60, 80, 16, seed=0), lambda: BPR(60, 80, 16, seed=0)])
def test_implicit_models_learn_planted_groups(make):
    data = planted()
    train, test = leave_one_out(data)
    model = make()
    before = ranking_metrics(model, train, test, ks=(10,))["recall@10"]
    history = fit_implicit(model, train, epochs=30, batch_size=256, lr=0.02, n_negatives=5)
    assert history[-1] < history[0]
    after = ranking_metrics(model, train, test, ks=(10,))
    assert after["recall@10"] > max(before, 0.5)
    if isinstance(model, CML):
        assert model.users.norm(dim=1).max() <= 1 + 1e-5 and model.items.norm(dim=1).max() <= 1 + 1e-5


@pytest.mark.parametrize("cls", [MetricRatingModel, BiasedMF])
def test_rating_models_fit(cls):
    rng = np.random.default_rng(2)
    n_u, n_i = 40, 50
    tu, ti = rng.normal(size=(n_u, 3)), rng.normal(size=(n_i, 3))
    u, i = rng.integers(0, n_u, 1500), rng.integers(0, n_i, 1500)
    r = np.clip(3 + (tu[u] * ti[i]).sum(1), 1, 5).astype(np.float32)
    data = Interactions(u, i, r, np.arange(1500), n_u, n_i)
    train, test = data.subset(np.arange(1500) < 1200), data.subset(np.arange(1500) >= 1200)
    model = cls(n_u, n_i, 8, global_mean=float(train.ratings.mean()), seed=0)
    baseline = rating_metrics(model, test)["rmse"]
    fit_explicit(model, train, epochs=40, batch_size=256, lr=0.02, l2=0.01)
    assert rating_metrics(model, test)["rmse"] < 0.8 * baseline
    if cls is MetricRatingModel:
        assert torch.linalg.eigvalsh(model.metric().detach()).min() >= -1e-6


@pytest.mark.skipif(not (SHARED_DATA / "movielens_100k").is_dir(), reason="shared MovieLens-100K not present")
def test_movielens_local_copy():
    everything = load_movielens_100k(SHARED_DATA / "movielens_100k")
    assert len(everything) == 100_000 and everything.n_users == 943 and everything.n_items == 1682
    train, test = load_movielens_100k(SHARED_DATA / "movielens_100k", "u1")
    assert len(train) == 80_000 and len(test) == 20_000
    with pytest.raises(ValueError, match="split"):
        load_movielens_100k(SHARED_DATA / "movielens_100k", "u9")


def test_missing_files_say_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_missing"):
        load_movielens_100k(tmp_path)


def test_save_load_and_cli(tmp_path):
    from typer.testing import CliRunner

    from metrix.apps.recommend import load_recommender, save_recommender
    from metrix.cli import app
    from metrix.io import CorruptFileError

    model = CML(10, 12, 4, margin=0.7, seed=1)
    path = save_recommender(model, tmp_path / "m.safetensors", extra={"a": 1})
    loaded, extra = load_recommender(path)
    assert extra == {"a": 1} and loaded.margin == 0.7
    assert torch.equal(loaded.scores(torch.arange(3)), model.scores(torch.arange(3)))
    (tmp_path / "bad").write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(CorruptFileError):
        load_recommender(tmp_path / "bad")
    # the CLI on a tiny MovieLens-format folder
    root = tmp_path / "ml"
    root.mkdir()
    data = planted(30, 40)
    lines = [f"{u + 1}\t{i + 1}\t{int(r)}\t{t}" for u, i, r, t in zip(data.users, data.items, data.ratings, data.timestamps)]
    (root / "u.data").write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    out = tmp_path / "cml"  # --out is the run folder
    r = runner.invoke(app, ["recommend", "train", "--root", str(root), "--split", "loo", "--dim", "8",
                            "--epochs", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "recall@10" in r.output
    r = runner.invoke(app, ["recommend", "eval", str(out), "--root", str(root), "--split", "loo", "--json"])
    assert r.exit_code == 0 and "ndcg@10" in r.output, r.output
    r = runner.invoke(app, ["recommend", "for-user", str(out), "--user", "1", "-k", "3", "--root", str(root), "--split", "loo"])
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 3, r.output
    r = runner.invoke(app, ["recommend", "train", "--root", str(root), "--model", "knn"])
    assert r.exit_code == 2 and "model must be" in r.output
