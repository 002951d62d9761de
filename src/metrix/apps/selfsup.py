"""Self-supervised contrastive learning of image representations: SimCLR and MoCo v2, with frozen-feature
evaluation (kNN accuracy and a linear probe).

* SimCLR (Chen et al., ICML 2020): two augmented views of every image in a batch, encoder + MLP projection
  head, NT-Xent over the 2B projections (each view's only positive is its twin) — :func:`metrix.losses.ntxent_loss`
  with the image index as label.
* MoCo v2 (He et al., CVPR 2020; Chen et al. 2020): queries from the model, keys of the other view from a
  :class:`~metrix.memory.MomentumEncoder`, negatives from a FIFO queue of past keys —
  :class:`~metrix.memory.CrossBatchMemory` around NT-Xent, each image labelled with a never-reused id so the
  queue never holds a positive. The current batch's other keys are negatives too (as in MoCo v3).
  Shuffling BN (the paper's multi-GPU remedy for batch-statistics leakage) is not emulated.

Labels are never seen while training. Downstream, use the backbone's output (``model.features``), not the
projection, as both papers do.

Example
-------
>>> import numpy as np
>>> X = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
>>> learner = ContrastiveLearner(method="simclr", input_shape=(1, 8, 8), seed=0)
>>> history = learner.fit(X, epochs=1, batch_size=32)
>>> learner.features(X).shape[0]
64
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metrix import distributed
from metrix._validation import check_positive
from metrix.apps.augment import ImageAugment
from metrix.losses import NTXentLoss
from metrix.checkpoints import LoopCheckpoint, capture, numpy_rng_state, restore, set_numpy_rng_state
from metrix.memory import CrossBatchMemory, MomentumEncoder
from metrix.models import EmbeddingModel, load_model, save_model
from metrix.training import optimizer_step

METHODS = ("simclr", "moco")


def check_images(X, name: str = "X") -> np.ndarray:
    """float32 images (N, C, H, W) in [0, 1]; grey (N, H, W) gets a channel axis."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim == 3:
        X = X[:, None]
    if X.ndim != 4 or len(X) == 0:
        raise ValueError(f"{name} must be images of shape (N, C, H, W) or (N, H, W) with N >= 1, got {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinity")
    if X.min() < 0 or X.max() > 1:
        raise ValueError(f"{name} must hold pixel values in [0, 1] (divide 8-bit images by 255), got [{X.min()}, {X.max()}]")
    return X


def _seeded(build, seed: int, *args, **kwargs):
    """Build with a fixed seed without disturbing the caller's global torch random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build(*args, **kwargs)


def default_model(input_shape, embedding_dim: int = 128, channels: int = 32, blocks: int = 3,
                  head_hidden_dim: int = 512, pixel_mean: float = 0.5, pixel_std: float = 0.25) -> EmbeddingModel:
    """Conv-net encoder (3×3 conv → BN → ReLU → pool blocks) + SimCLR's MLP projection head."""
    shape = tuple(int(s) for s in input_shape)
    return EmbeddingModel("convnet", embedding_dim, normalize=True, input_shape=shape,
                          backbone_kwargs={"channels": int(channels), "blocks": int(blocks)},
                          input_mean=torch.full(shape, float(pixel_mean)), input_std=torch.full(shape, float(pixel_std)),
                          head_hidden_dim=head_hidden_dim)


class ContrastiveLearner:
    """Train an encoder without labels by SimCLR or MoCo v2.

    The default model is :func:`default_model`; its input standardisation is set from the training
    images' mean and standard deviation when :meth:`fit` starts.

    Parameters
    ----------
    method : ``"simclr"`` or ``"moco"``
    model : an :class:`~metrix.models.EmbeddingModel` (projection head = its head); default
        :func:`default_model` for ``input_shape``
    temperature : NT-Xent temperature (SimCLR's small-image default 0.5; MoCo v2 uses 0.2)
    queue_size, momentum : MoCo's queue of negatives and key-encoder momentum
    augment : an :class:`~metrix.apps.augment.ImageAugment` (default one seeded with ``seed``)
    """

    def __init__(self, method: str = "simclr", model: EmbeddingModel | None = None, input_shape=(1, 28, 28),
                 temperature: float | None = None, queue_size: int = 4096, momentum: float = 0.99,
                 augment: ImageAugment | None = None, seed: int = 0):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.seed = method, int(seed)
        # the default model standardises pixels with the training images' statistics (set in fit)
        self._own_model = model is None
        self.model = model if model is not None else _seeded(default_model, self.seed, input_shape)
        self.temperature = check_positive(temperature if temperature is not None else (0.5 if method == "simclr" else 0.2), "temperature")
        self.queue_size, self.momentum = int(queue_size), float(momentum)
        self.augment = augment if augment is not None else ImageAugment(seed=self.seed)

    def _check_fit_args(self, X, epochs, batch_size):
        X = check_images(X)
        if self.model.input_shape is not None and X.shape[1:] != self.model.input_shape:
            raise ValueError(f"images have shape {X.shape[1:]}, the model expects {self.model.input_shape}")
        if int(epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if not 2 <= int(batch_size) <= len(X):
            raise ValueError(f"batch_size must be in [2, {len(X)}] (contrastive batches need negatives), got {batch_size}")
        return X

    def fit(self, X, epochs: int = 5, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-6,
            log_every: int = 0, echo=print, checkpoint: LoopCheckpoint | None = None,
            resume: bool = False) -> list[float]:
        """Train on unlabelled images in [0, 1]; returns the loss of every step (Adam, cosine-decayed lr).

        ``checkpoint`` saves everything the next epoch depends on (weights, optimiser, schedule, MoCo's key
        encoder and queue, the shuffling, augmentation and torch generators) every ``checkpoint.every``
        epochs; ``resume=True`` continues from its last one to the weights an uninterrupted run ends with."""
        X = self._check_fit_args(X, epochs, batch_size)
        if self._own_model and self.model.preprocess is not None:
            self.model.preprocess.mean.fill_(float(X.mean()))
            self.model.preprocess.std.fill_(max(float(X.std()), 1e-6))
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        model, batch_size = self.model, int(batch_size)
        device = next(model.parameters()).device
        steps_per_epoch = len(X) // batch_size
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        ntxent = NTXentLoss(self.temperature)
        if self.method == "moco":  # kept as attributes after fit, for inspection
            keys = self.key_encoder_ = MomentumEncoder(model, self.momentum)
            queue = self.queue_ = CrossBatchMemory(ntxent, model.embedding_dim, self.queue_size).to(device)
        history, start, step, done = [], time.perf_counter(), 0, 0
        moco = self.method == "moco"
        # in a process group: every rank augments the whole global batch (the generators stay in step with one
        # process) and embeds its share; the loss sees the global batch, the gradients are summed over ranks
        share = distributed.my_share(range(batch_size))
        objective = distributed.GlobalBatchLoss(queue if moco else ntxent)
        sync = lambda: distributed.sum_gradients(model.parameters())  # noqa: E731
        objects = {"model": model, "optimizer": opt, "scheduler": sched, "keys": keys if moco else None,
                   "queue": queue if moco else None}
        saved = restore(checkpoint, objects) if resume else None
        if saved is not None:
            done, state, meta = saved
            self.augment.generator.set_state(state["augment"])
            set_numpy_rng_state(rng, meta["order_rng"])
            history, step = list(meta["history"]), done * steps_per_epoch
        model.train()
        with distributed.global_batchnorm(model), distributed.global_batchnorm(keys if moco else nn.Identity()):
            self._epochs(X, epochs, batch_size, done, rng, share, objective, keys if moco else None, opt, sched,
                         sync, history, step, log_every, echo, start, checkpoint, objects)
        model.eval()
        return history

    def _epochs(self, X, epochs, batch_size, done, rng, share, objective, keys, opt, sched, sync, history, step,
                log_every, echo, start, checkpoint, objects):
        model, device = self.model, next(self.model.parameters()).device
        steps_per_epoch = len(X) // batch_size
        for epoch in range(done + 1, int(epochs) + 1):
            order = rng.permutation(len(X))
            for s in range(steps_per_epoch):
                x = torch.from_numpy(X[order[s * batch_size : (s + 1) * batch_size]]).to(device)
                v1, v2 = self.augment(x), self.augment(x)
                v1, v2 = v1[share.start : share.stop], v2[share.start : share.stop]
                own = torch.arange(share.start, share.stop, device=device)
                if self.method == "simclr":
                    z = model(torch.cat([v1, v2]))
                    loss = objective(z, own.repeat(2))
                else:
                    # ids never reused: the queue never holds a positive
                    ids = step * batch_size + own
                    loss = objective(model(v1), ids, keys(v2), ids)
                history.append(optimizer_step(loss, opt, f"step {step}", sync))
                sched.step()
                if keys is not None:
                    keys.update(model)
                step += 1
                if log_every and step % log_every == 0:
                    echo(f"step {step:6d}  loss {np.mean(history[-log_every:]):.4f}  {time.perf_counter() - start:.0f} s")
            if checkpoint is not None and checkpoint.due(epoch, int(epochs)):
                capture(checkpoint, epoch, objects, {"history": history, "order_rng": numpy_rng_state(rng)},
                        augment=self.augment.generator.get_state())

    def features(self, X, batch_size: int = 1024, progress: str | None = None) -> np.ndarray:
        """Frozen backbone features (the representation evaluated downstream)."""
        return self.model.embed(check_images(X), batch_size, features=True, progress=progress).numpy()

    def save(self, folder) -> Path:
        return save_model(self.model, folder, {"selfsup": {"method": self.method, "temperature": self.temperature,
                                                           "queue_size": self.queue_size, "momentum": self.momentum,
                                                           "seed": self.seed}})

    @classmethod
    def load(cls, folder) -> "ContrastiveLearner":
        model, config = load_model(folder)
        info = config.get("selfsup")
        if not isinstance(info, dict):
            raise ValueError(f"{folder} holds no self-supervised model (config has no 'selfsup' section)")
        return cls(info["method"], model, temperature=info["temperature"], queue_size=info["queue_size"],
                   momentum=info["momentum"], seed=info["seed"])


def _check_features(train, train_labels, test, test_labels):
    out = []
    for x, y, name in ((train, train_labels, "train"), (test, test_labels, "test")):
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        y = np.asarray(y).reshape(-1)
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"{name}: {len(x)} feature rows but {len(y)} labels")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} features contain NaN or infinity")
        out += [x, y]
    if out[0].shape[1] != out[2].shape[1]:
        raise ValueError(f"train features are {out[0].shape[1]}-d, test features {out[2].shape[1]}-d")
    return out


def linear_probe(train, train_labels, test, test_labels, weight_decay: float = 1e-4, max_iter: int = 200) -> float:
    """Test accuracy of a multinomial logistic regression on frozen features.

    Features are standardised with the training statistics; the regularised cross-entropy (convex) is
    minimised with full-batch L-BFGS (strong-Wolfe line search), so the result does not depend on a learning
    rate or batch order.
    """
    return _probe_accuracy(*_check_features(train, train_labels, test, test_labels), weight_decay, max_iter)


def _probe_accuracy(xtr, ytr, xte, yte, weight_decay, max_iter=200) -> float:
    """:func:`linear_probe` on features already checked by ``_check_features``."""
    classes, ytr_idx = np.unique(ytr, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("the linear probe needs at least two classes in the training labels")
    mean, std = xtr.mean(0), xtr.std(0)
    std[std < 1e-12] = 1.0  # constant features carry no information; keep them finite
    a = torch.from_numpy(((xtr - mean) / std).astype(np.float32))
    t = torch.from_numpy(ytr_idx)
    w = torch.zeros(a.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=int(max_iter), history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(a @ w + b, t) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = classes[((torch.from_numpy(((xte - mean) / std).astype(np.float32)) @ w + b).argmax(1)).numpy()]
    return float((pred == yte).mean())


def evaluate_features(train, train_labels, test, test_labels, k: int = 20, metric: str = "cosine",
                      weight_decay: float = 1e-4, progress: str | None = None) -> dict:
    """kNN accuracy (test queries against the training set) and linear-probe accuracy of frozen features.
    ``progress``: a label for the kNN's progress bar (shown on a terminal)."""
    from metrix.evaluation import knn_accuracy

    xtr, ytr, xte, yte = _check_features(train, train_labels, test, test_labels)
    knn = knn_accuracy(xte.astype(np.float32), yte, xtr.astype(np.float32), ytr, k=k, metric=metric,
                       progress=progress and f"{progress}: kNN")
    return {"knn_accuracy": knn, "linear_probe_accuracy": _probe_accuracy(xtr, ytr, xte, yte, weight_decay),
            "k": int(k), "metric": metric, "dim": int(xtr.shape[1])}


def random_encoder_features(X, input_shape, seed: int = 0, progress: str | None = None, **model_kwargs) -> np.ndarray:
    """Features of an untrained :func:`default_model` (the baseline every learned encoder must beat)."""
    model = _seeded(default_model, seed, input_shape, **model_kwargs)
    return model.embed(check_images(X), features=True, progress=progress).numpy()


__all__ = ["ContrastiveLearner", "default_model", "linear_probe", "evaluate_features", "random_encoder_features",
           "check_images", "METHODS"]

