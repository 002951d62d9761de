"""Episodes, prototype logits against their definition, training on synthetic images, persistence, CLI."""

import json

import numpy as np
import pytest
import torch

from metrix.apps.fewshot import EpisodeSampler, PrototypicalNetwork, prototype_logits, rotate_classes
from metrix.io import CorruptFileError


def test_episode_sampler_contract():
    labels = np.repeat(np.arange(8), 6)
    labels = np.r_[labels, [99, 99]]  # a class too small for 2-shot + 3-query episodes
    sampler = EpisodeSampler(labels, n_way=4, k_shot=2, n_query=3, episodes=50, seed=3)
    episodes = list(sampler)
    assert len(episodes) == 50 == len(sampler)
    for support, query in episodes:
        assert len(support) == 8 and len(query) == 12
        assert not set(support) & set(query)
        s_cls = labels[support].reshape(4, 2)
        q_cls = labels[query].reshape(4, 3)
        assert (s_cls == s_cls[:, :1]).all() and (q_cls == q_cls[:, :1]).all()  # class-major
        assert (s_cls[:, 0] == q_cls[:, 0]).all() and len(set(s_cls[:, 0])) == 4
        assert 99 not in s_cls
    again = list(EpisodeSampler(labels, 4, 2, 3, 50, seed=3))
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(episodes, again))
    with pytest.raises(ValueError, match="classes with at least"):
        EpisodeSampler(labels, n_way=9, k_shot=2, n_query=3, episodes=1)
    with pytest.raises(ValueError, match="k_shot"):
        EpisodeSampler(labels, n_way=2, k_shot=0, n_query=3, episodes=1)


def test_prototype_logits_match_definition():
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(3 * 4, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    logits = prototype_logits(support, query, 3)
    for i in range(7):
        for k in range(3):
            c = support[4 * k : 4 * k + 4].mean(0)
            assert logits[i, k].item() == pytest.approx(-((query[i] - c) ** 2).sum().item(), rel=1e-10)
    assert torch.autograd.gradcheck(lambda s, q: prototype_logits(s, q, 3), (support.requires_grad_(), query.requires_grad_()))


def test_rotate_classes():
    X = np.arange(2 * 1 * 3 * 3, dtype=np.float32).reshape(2, 1, 3, 3)
    Xr, yr = rotate_classes(X, np.array(["a", "b"]))
    assert Xr.shape == (8, 1, 3, 3) and len(set(yr)) == 8
    np.testing.assert_array_equal(Xr[2, 0], np.rot90(X[0, 0]))


def synthetic_images(n_classes=12, per_class=10, seed=0):
    """Each class is a fixed random 8×8 pattern plus noise."""
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(n_classes, 1, 8, 8))
    y = np.repeat(np.arange(n_classes), per_class)
    X = patterns[y] + 0.8 * rng.normal(size=(len(y), 1, 8, 8))
    return X.astype(np.float32), y


def test_training_improves_few_shot_accuracy(tmp_path):
    X, y = synthetic_images()
    torch.manual_seed(0)
    net = PrototypicalNetwork(input_shape=(1, 8, 8))
    before = net.evaluate(X, y, n_way=5, k_shot=1, n_query=5, episodes=60, seed=1)["accuracy"]
    history = net.fit(X, y, n_way=5, k_shot=2, n_query=3, episodes=60, seed=0)
    assert np.mean(history[-10:]) < np.mean(history[:10])
    after = net.evaluate(X, y, n_way=5, k_shot=1, n_query=5, episodes=60, seed=1)
    assert after["accuracy"] > before and after["accuracy"] > 0.6
    assert 0 < after["ci95"] < 0.1 and after["episodes"] == 60
    path = net.save(tmp_path / "proto.safetensors")
    loaded = PrototypicalNetwork.load(path)
    assert loaded.evaluate(X, y, 5, 1, 5, 60, seed=1)["accuracy"] == pytest.approx(after["accuracy"])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError):
        PrototypicalNetwork.load(tmp_path / "bad")
    with pytest.raises(ValueError, match="NaN"):
        net.fit(np.full_like(X, np.nan), y, episodes=1, n_way=2, k_shot=1, n_query=1)


def test_fewshot_cli(tmp_path):
    from typer.testing import CliRunner

    from metrix.cli import app

    X, y = synthetic_images()
    data = tmp_path / "imgs.npz"
    np.savez(data, X=X, y=y)
    model = tmp_path / "protonet"  # --out is the run folder
    runner = CliRunner()
    r = runner.invoke(app, ["fewshot", "train", "--data", str(data), "--out", str(model), "--episodes", "20",
                            "--n-way", "5", "--k-shot", "2", "--n-query", "3", "--no-rotations"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["fewshot", "eval", str(model), "--data", str(data), "--n-way", "5", "--k-shot", "1",
                            "--n-query", "5", "--episodes", "30", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["episodes"] == 30 and 0 <= out["accuracy"] <= 1
    r = runner.invoke(app, ["fewshot", "eval", str(model), "--data", str(data), "--n-way", "50"])
    assert r.exit_code == 2 and "classes" in r.output
