"""Self-supervised learning: batched augmentations against per-pixel loop references, SimCLR/MoCo training
mechanics, the linear probe against scikit-learn, persistence and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from metrix.apps.augment import ImageAugment, crop_flip_rotate_matrices, gaussian_blur
from metrix.apps.selfsup import (ContrastiveLearner, check_images, default_model, evaluate_features, linear_probe,
                                 random_encoder_features)
from metrix.cli import app
from metrix.io import CorruptFileError
from tests.conftest import flip_byte

GEOMETRY_ONLY = dict(brightness=0.0, contrast=0.0, blur=0.0, noise=0.0)
IDENTITY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, degrees=0.0, **GEOMETRY_ONLY)


def _images(n=6, c=1, h=10, w=12, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((n, c, h, w), dtype=np.float32))


def reference_affine_sample(img: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """grid_sample(bilinear, zeros, align_corners=False) of one (C, H, W) image, one output pixel at a time."""
    c, h, w = img.shape
    out = np.zeros_like(img, dtype=np.float64)
    for i in range(h):
        for j in range(w):
            xo, yo = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
            xi = theta[0, 0] * xo + theta[0, 1] * yo + theta[0, 2]
            yi = theta[1, 0] * xo + theta[1, 1] * yo + theta[1, 2]
            px, py = ((xi + 1) * w - 1) / 2, ((yi + 1) * h - 1) / 2
            x0, y0 = math.floor(px), math.floor(py)
            for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[:, i, j] += wy * wx * img[:, yy, xx]
    return out


def reference_blur(img: np.ndarray, sigma: float, size: int = 5) -> np.ndarray:
    """Separable Gaussian blur with replicated borders, written as explicit sums."""
    c, h, w = img.shape
    half = size // 2
    k = np.array([math.exp(-0.5 * (o / max(sigma, 1e-3)) ** 2) for o in range(-half, half + 1)])
    k /= k.sum()
    rows = np.zeros((c, h, w))
    for j in range(w):
        for t, o in enumerate(range(-half, half + 1)):
            rows[:, :, j] += k[t] * img[:, :, min(max(j + o, 0), w - 1)]
    out = np.zeros((c, h, w))
    for i in range(h):
        for t, o in enumerate(range(-half, half + 1)):
            out[:, i, :] += k[t] * rows[:, min(max(i + o, 0), h - 1), :]
    return out


# --- augmentations ------------------------------------------------------------------------------

def test_identity_settings_return_the_input():
    x = _images()
    assert torch.allclose(ImageAugment(**IDENTITY)(x), x, atol=1e-6)


def test_flip_only_mirrors_the_width_axis():
    x = _images()
    out = ImageAugment(**{**IDENTITY, "flip": 1.0})(x)
    assert torch.allclose(out, torch.flip(x, dims=[3]), atol=1e-6)


def test_crop_flip_rotate_matches_a_per_pixel_bilinear_reference():
    x = _images(n=4, c=2)
    aug = ImageAugment(degrees=30.0, flip=0.5, seed=3, **GEOMETRY_ONLY)
    out = aug(x).double().numpy()
    # the augmenter draws the matrices first from its generator: replay that draw
    gen = torch.Generator().manual_seed(3)
    theta = crop_flip_rotate_matrices(4, aug.scale, aug.ratio, aug.flip, aug.degrees, gen).double().numpy()
    for b in range(4):
        ref = np.clip(reference_affine_sample(x[b].double().numpy(), theta[b]), 0, 1)
        np.testing.assert_allclose(out[b], ref, atol=1e-5)


def test_crop_windows_have_the_requested_area_and_stay_inside_the_image():
    gen = torch.Generator().manual_seed(0)
    theta = crop_flip_rotate_matrices(2000, scale=(0.3, 0.6), ratio=(0.5, 2.0), flip=0.5, degrees=0.0, generator=gen)
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1].abs()
    area = w * h
    clipped = (w >= 1 - 1e-6) | (h >= 1 - 1e-6)   # a side longer than the image is cut to it
    assert torch.all(area[~clipped] >= 0.3 - 1e-6) and torch.all(area <= 0.6 + 1e-6)
    assert torch.all(theta[:, 0, 2].abs() <= 1 - w + 1e-6) and torch.all(theta[:, 1, 2].abs() <= 1 - h + 1e-6)
    flipped = (theta[:, 0, 0] < 0).float().mean()
    assert 0.45 < flipped < 0.55


def test_blur_matches_the_loop_reference_per_sample_sigma():
    x = _images(n=3, c=2)
    sigma = torch.tensor([0.0, 0.7, 1.5])
    out = gaussian_blur(x, sigma).double().numpy()
    for b in range(3):
        np.testing.assert_allclose(out[b], reference_blur(x[b].double().numpy(), float(sigma[b])), atol=1e-6)
    assert torch.allclose(gaussian_blur(x, torch.zeros(3)), x, atol=1e-6)


def test_contrast_keeps_each_images_mean_when_nothing_clips():
    x = 0.4 + 0.2 * _images()  # values in [0.4, 0.6]: contrast <= 1.5 never leaves [0, 1]
    out = ImageAugment(**{**IDENTITY, "contrast": 0.5}, seed=1)(x)
    assert torch.allclose(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5)
    assert not torch.allclose(out, x)


def test_views_are_seeded_in_range_and_differ():
    x = _images(n=16)
    a, b = ImageAugment(seed=5)(x), ImageAugment(seed=5)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, ImageAugment(seed=6)(x))
    aug = ImageAugment(seed=5)
    assert not torch.equal(aug(x), aug(x))  # successive calls draw new views
    assert a.min() >= 0 and a.max() <= 1 and a.shape == x.shape
    assert ImageAugment()(x[:, 0]).shape == x[:, 0].shape  # (B, H, W) grey input


@pytest.mark.parametrize("kwargs", [{"scale": (0.8, 0.2)}, {"scale": (0.0, 1.0)}, {"flip": 1.5}, {"degrees": -1},
                                    {"noise": 2.0}, {"blur_sigma": (2.0, 1.0)}])
def test_bad_augment_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ImageAugment(**kwargs)


def test_bad_image_batches_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        ImageAugment()(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="shape"):
        ImageAugment()(torch.zeros(0, 1, 4, 4))


# --- inputs -------------------------------------------------------------------------------------

def test_check_images_rejects_bad_pixels():
    assert check_images(np.zeros((2, 5, 5))).shape == (2, 1, 5, 5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_images(np.full((2, 1, 4, 4), 255.0))
    with pytest.raises(ValueError, match="NaN"):
        check_images(np.full((2, 1, 4, 4), np.nan))
    with pytest.raises(ValueError, match="shape"):
        check_images(np.zeros((3, 16)))


# --- training -----------------------------------------------------------------------------------

def _toy(n=96, side=8, seed=0):
    """Images of a bright bar, horizontal or vertical, at random places (plus noise)."""
    rng = np.random.default_rng(seed)
    X = 0.1 * rng.random((n, 1, side, side), dtype=np.float32)
    y = rng.integers(0, 2, n)
    for i in range(n):
        p = rng.integers(1, side - 1)
        if y[i]:
            X[i, 0, p, :] = 1.0
        else:
            X[i, 0, :, p] = 1.0
    return X, y


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_training_lowers_the_contrastive_loss(method):
    X, _ = _toy()
    learner = ContrastiveLearner(method, input_shape=(1, 8, 8), queue_size=64, momentum=0.9, seed=0,
                                 model=default_model((1, 8, 8), embedding_dim=16, channels=8, blocks=2, head_hidden_dim=32))
    history = learner.fit(X, epochs=25, batch_size=32, lr=3e-3)
    assert len(history) == 25 * 3 and np.isfinite(history).all()
    assert np.mean(history[-6:]) < np.mean(history[:6]) - 0.1


def test_simclr_first_step_is_ntxent_of_the_two_views():
    from metrix.losses import ntxent_loss

    X, _ = _toy(n=32)
    learner = ContrastiveLearner("simclr", input_shape=(1, 8, 8), seed=1)
    probe = ContrastiveLearner("simclr", input_shape=(1, 8, 8), seed=1)  # same initial weights and augmenter
    history = learner.fit(X, epochs=1, batch_size=32)
    probe.model.preprocess.mean.fill_(float(X.mean()))
    probe.model.preprocess.std.fill_(float(X.std()))
    order = np.random.default_rng(1).permutation(32)
    x = torch.from_numpy(X[order])
    v1, v2 = probe.augment(x), probe.augment(x)
    probe.model.train()
    expected = ntxent_loss(probe.model(torch.cat([v1, v2])), torch.arange(32).repeat(2), temperature=0.5)
    assert history[0] == pytest.approx(expected.item(), rel=1e-5)


def test_moco_fills_its_queue_with_momentum_keys():
    X, _ = _toy(n=64)
    learner = ContrastiveLearner("moco", input_shape=(1, 8, 8), queue_size=48, seed=0)
    learner.fit(X, epochs=1, batch_size=16)  # 4 steps of 16 keys: the 48-slot queue wraps once
    keys, labels = learner.queue_.contents()
    assert len(learner.queue_) == 48
    assert sorted(labels.tolist()) == list(range(16, 64))  # the newest three batches, ids never reused
    assert torch.allclose(keys.norm(dim=1), torch.ones(48), atol=1e-5)
    model_p = torch.cat([p.flatten() for p in learner.model.parameters()])
    key_p = torch.cat([p.flatten() for p in learner.key_encoder_.encoder.parameters()])
    assert not torch.allclose(model_p, key_p) and all(not p.requires_grad for p in learner.key_encoder_.parameters())


def test_same_seed_same_training():
    X, _ = _toy(n=64)
    runs = [ContrastiveLearner("simclr", input_shape=(1, 8, 8), seed=4).fit(X, epochs=1, batch_size=16) for _ in range(2)]
    assert runs[0] == runs[1]


def test_fit_validates_up_front():
    X, _ = _toy(n=32)
    learner = ContrastiveLearner("simclr", input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="batch_size"):
        learner.fit(X, batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        learner.fit(X, batch_size=64)
    with pytest.raises(ValueError, match="expects"):
        learner.fit(np.zeros((32, 1, 6, 6), np.float32), batch_size=8)
    with pytest.raises(ValueError, match="epochs"):
        learner.fit(X, epochs=0)
    with pytest.raises(ValueError, match="method"):
        ContrastiveLearner("byol")


def test_save_load_round_trip_and_corruption(tmp_path):
    X, _ = _toy(n=32)
    learner = ContrastiveLearner("moco", input_shape=(1, 8, 8), queue_size=32, seed=2)
    learner.fit(X, epochs=1, batch_size=16)
    learner.save(tmp_path / "m")
    again = ContrastiveLearner.load(tmp_path / "m")
    assert again.method == "moco" and again.temperature == learner.temperature
    np.testing.assert_array_equal(again.features(X), learner.features(X))
    flip_byte(tmp_path / "m" / "model.safetensors")
    with pytest.raises(CorruptFileError):
        ContrastiveLearner.load(tmp_path / "m")


def test_loading_a_supervised_run_is_refused(tmp_path):
    from metrix.models import EmbeddingModel, save_model

    save_model(EmbeddingModel("mlp", 4, input_shape=(6,)), tmp_path / "run")
    with pytest.raises(ValueError, match="selfsup"):
        ContrastiveLearner.load(tmp_path / "run")


# --- frozen-feature evaluation ------------------------------------------------------------------

def test_linear_probe_matches_scikit_learn_logistic_regression():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    Xtr, ytr, Xte, yte = X[:900], y[:900], X[900:], y[900:]
    wd = 1e-2
    ours = linear_probe(Xtr, ytr, Xte, yte, weight_decay=wd)
    scaler = StandardScaler().fit(Xtr)
    # ours: mean cross-entropy + wd/2·‖W‖²  ==  scikit-learn's C·Σ cross-entropy + ½‖W‖² with C = 1/(wd·n)
    clf = LogisticRegression(C=1 / (wd * len(Xtr)), max_iter=5000, tol=1e-10).fit(scaler.transform(Xtr), ytr)
    theirs = float((clf.predict(scaler.transform(Xte)) == yte).mean())
    assert ours == pytest.approx(theirs, abs=2 / len(yte))
    assert ours > 0.85


def test_evaluate_features_on_separable_features():
    rng = np.random.default_rng(0)
    ytr, yte = rng.integers(0, 3, 120), rng.integers(0, 3, 60)
    centres = 5 * rng.normal(size=(3, 4))
    tr, te = centres[ytr] + rng.normal(size=(120, 4)), centres[yte] + rng.normal(size=(60, 4))
    r = evaluate_features(tr, ytr, te, yte, k=5)
    assert r["knn_accuracy"] > 0.9 and r["linear_probe_accuracy"] > 0.9 and r["dim"] == 4
    shuffled = evaluate_features(tr, rng.permutation(ytr), te, yte, k=5)
    assert shuffled["linear_probe_accuracy"] < 0.7  # the probe cannot succeed without signal


def test_evaluation_rejects_bad_features():
    with pytest.raises(ValueError, match="labels"):
        evaluate_features(np.zeros((5, 2)), np.zeros(4), np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="-d"):
        evaluate_features(np.zeros((5, 2)), np.arange(5) % 2, np.zeros((3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        evaluate_features(np.full((5, 2), np.nan), np.arange(5) % 2, np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(np.ones((5, 2)), np.zeros(5), np.zeros((3, 2)), np.zeros(3))


def test_random_encoder_features_are_seeded():
    X, _ = _toy(n=8)
    a, b = random_encoder_features(X, (1, 8, 8), seed=1), random_encoder_features(X, (1, 8, 8), seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, random_encoder_features(X, (1, 8, 8), seed=2))


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_selfsup_train_and_eval_on_digits(tmp_path):
    runner = CliRunner()
    out = tmp_path / "ss"
    r = runner.invoke(app, ["selfsup", "train", "--method", "moco", "--data", "digits", "--epochs", "1",
                            "--batch-size", "128", "--queue-size", "256", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["selfsup", "eval", str(out), "--data", "digits", "--baselines"])
    assert r.exit_code == 0, r.output
    assert "trained" in r.output and "raw pixels" in r.output and "random encoder" in r.output
    r = runner.invoke(app, ["selfsup", "train", "--method", "byol", "--data", "digits", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "method" in r.output
    r = runner.invoke(app, ["selfsup", "eval", str(tmp_path / "missing"), "--data", "digits"])
    assert r.exit_code == 2


def test_building_a_learner_leaves_the_global_random_state_alone():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    ContrastiveLearner("simclr", input_shape=(1, 8, 8), seed=7)
    random_encoder_features(np.zeros((2, 1, 8, 8), np.float32), (1, 8, 8), seed=7)
    assert torch.equal(torch.rand(3), expected)
