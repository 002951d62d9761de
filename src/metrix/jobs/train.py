"""The main job behind ``metrix train`` / ``evaluate`` / ``embed``: data → split → model → train → report.

A run folder ``runs/<name>/`` holds ``model.safetensors``, ``config.json`` (architecture + the
training settings + the split), ``metrics.json`` (``{"before": ..., "after": ...}``),
``history.csv`` and, with the ``plots`` extra, ``curves.png`` and ``embedding.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from metrix.datasets import class_split, encode_labels, load_dataset, load_inputs, stratified_split
from metrix.evaluation import retrieval_metrics
from metrix.io import atomic_write_bytes, load_json, load_tagged, reading, save_json
from metrix import distributed, registry
from metrix.losses import build_loss
from metrix.registry import lookup
from metrix.apps.augment import ImageAugment
from metrix.models import OUTPUTS, PRETRAINED_BACKBONES, EmbeddingModel, input_statistics, save_model
from metrix.runs import Run, as_run, at_run_size, check_device, load_at_run_size, new_run_dir
from metrix.training import CHECKPOINT_TAG, LAST_FILE, Trainer, check_transfer_options

REPORTED = ("precision_at_1", "r_precision", "map_at_r")
# geometry -> (model options, the metric its embeddings are compared with)
GEOMETRIES = {"sphere": ({"normalize": True}, "euclidean"),
              "poincare": ({"normalize": False, "ball_curvature": 1.0}, "poincare")}


@dataclass
class TrainConfig:
    """Every setting of ``metrix train``; a YAML file may set any of them (CLI flags win)."""

    data: str = "digits"
    label_column: str = "label"
    image_size: list[int] | None = None
    loss: str = "ntxent"  # any entry of `metrix list losses`
    triplets: str | None = None  # the loss's `triplets` parameter (triplet: semihard unless given)
    margin: float | None = None  # the loss's `margin` parameter; None: its default
    temperature: float | None = None  # the loss's `temperature` parameter; None: its default
    loss_params: dict = field(default_factory=dict)  # any other parameter of the loss (--loss-param key=value)
    miner: str | None = None  # a pair miner for losses that take one (`metrix list miners`)
    miner_params: dict = field(default_factory=dict)
    backbone: str = "mlp"  # a registry name (`metrix list backbones`) or hf:/path/to/local/model
    backbone_params: dict = field(default_factory=dict)  # any parameter of the backbone (--backbone-param key=value)
    hidden_dims: list[int] = field(default_factory=lambda: [256, 256])
    freeze_backbone: bool = False  # train the head only (a linear probe of the backbone's features)
    unfreeze_after: int | None = None  # with freeze_backbone: the backbone trains too after this many epochs
    backbone_lr_scale: float = 1.0  # the backbone's learning rate relative to --lr
    freeze_batchnorm: bool = False  # the backbone's BatchNorm statistics stay as they are (fine-tuning)
    precision: str = "fp32"  # fp32, bf16 (CPU or GPU) or fp16 (GPU): the forward pass's dtype
    augment: bool = False  # random crops, flips, rotations, colour jitter, blur and noise on training images
    embedding_dim: int = 64
    head_hidden_dim: int | None = None  # the head as an MLP (Linear → BatchNorm → ReLU → Linear) of this width
    model_output: str = "head"  # "features": the run embeds with the backbone's features, the head only trains
    geometry: str = "sphere"  # "sphere": unit vectors, Euclidean distance; "poincare": the Poincaré ball
    epochs: int = 40
    lr: float = 1e-3
    loss_lr: float | None = None
    weight_decay: float = 1e-4
    classes_per_batch: int = 10
    samples_per_class: int = 16
    patience: int | None = None
    test_size: float = 0.3  # of the samples, or with split="classes" of the classes
    val_size: float = 0.15  # of the training split, for per-epoch validation and the best epoch
    split: str = "samples"  # "classes": test (and validation) classes are never trained on
    seed: int = 0
    out: str | None = None  # the run folder (default runs/<name>)
    name: str | None = None  # the run's name (default <data>-<loss>): names the default folder
    progress: bool = True
    checkpoint_every: int = 1  # epochs between resumable checkpoints in <run>/checkpoints/ (0: none)
    test_data: str | None = None  # an official test set (e.g. fashion-mnist:test) instead of a random split
    device: str = "cpu"  # where the model trains: cpu, cuda, cuda:N, mps

    @classmethod
    def from_sources(cls, yaml_path: str | None = None, **overrides) -> "TrainConfig":
        """Defaults, then the YAML file, then explicit overrides (``None`` means "not given")."""
        values: dict = {}
        if yaml_path:
            import yaml

            with open(yaml_path) as fh:
                loaded = yaml.safe_load(fh) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{yaml_path} must hold a mapping of settings")
            values.update({k.replace("-", "_"): v for k, v in loaded.items()})
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known settings are {sorted(known)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {sorted(GEOMETRIES)}, got {self.geometry!r}")
        entry = lookup("losses", self.loss)
        if self.geometry not in entry.geometries:
            able = sorted(n for n, e in registry.losses().items() if self.geometry in e.geometries)
            raise ValueError(f"geometry {self.geometry!r} needs a loss on distances: {', '.join(able)} "
                             f"(got {self.loss!r}, which works on cosine similarities or class proxies)")
        _loss_kwargs(self)  # every flag and --loss-param names a parameter of this loss
        if self.miner is not None:
            if not entry.takes_pairs:
                raise ValueError(f"loss {self.loss!r} does not take a miner's pairs; losses that do: "
                                 f"{', '.join(sorted(n for n, e in registry.losses().items() if e.takes_pairs))}")
            lookup("miners", self.miner).check_params(self.miner_params)
        if self.backbone.startswith("hf:"):
            if "path" in self.backbone_params:
                raise ValueError("give the model folder once: --backbone hf:/path, not also --backbone-param path=")
        else:
            lookup("backbones", self.backbone).check_params(self.backbone_params)
        if self.model_output not in OUTPUTS:
            raise ValueError(f"--model-output must be one of {', '.join(OUTPUTS)}, got {self.model_output!r}")
        if self.model_output == "features" and self.geometry != "sphere":
            raise ValueError("--model-output features hands on the backbone's features on the unit sphere; "
                             f"--geometry {self.geometry} needs the head (--model-output head)")
        if self.head_hidden_dim is not None and int(self.head_hidden_dim) < 1:
            raise ValueError(f"--head-hidden-dim must be >= 1, got {self.head_hidden_dim}")
        check_transfer_options(self.freeze_backbone, self.unfreeze_after, self.backbone_lr_scale, self.precision,
                               self.model_output == "features")
        if self.split not in ("samples", "classes"):
            raise ValueError(f"--split must be 'samples' or 'classes', got {self.split!r}")
        if not 0 < self.test_size < 1 or not 0 <= self.val_size < 1:
            raise ValueError(f"test_size must be in (0, 1) and val_size in [0, 1) (settings of --config), got "
                             f"{self.test_size} and {self.val_size}")
        check_device(self.device)
        if int(self.checkpoint_every) < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 epochs (0: no checkpoints), got {self.checkpoint_every}")
        for name in ("epochs", "embedding_dim", "classes_per_batch", "samples_per_class"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def _loss_kwargs(cfg: TrainConfig) -> dict:
    """The loss's keyword arguments: the registry's train defaults, then the flags, then --loss-param."""
    entry = lookup("losses", cfg.loss)
    kw = dict(registry.TRAIN_DEFAULTS.get(cfg.loss, {}))
    for flag in ("margin", "temperature", "triplets"):
        value = getattr(cfg, flag)
        if value is not None:
            if flag not in entry.params:
                raise ValueError(f"--{flag} does not apply to loss {cfg.loss!r}, which has no {flag!r} parameter; "
                                 f"its parameters are {', '.join(entry.params) or 'none'} (set them with --loss-param)")
            kw[flag] = value
    kw.update(entry.check_params(cfg.loss_params))
    if cfg.geometry == "poincare":
        kw["metric"] = "poincare"
    return kw


def _backbone(cfg: TrainConfig) -> tuple[str, dict]:
    """The registry backbone and its options: ``hf:/path`` is ``hf_vision`` with that path."""
    if cfg.backbone.startswith("hf:"):
        return "hf_vision", {"path": cfg.backbone[3:], **cfg.backbone_params}
    kwargs = {"hidden_dims": tuple(cfg.hidden_dims)} if cfg.backbone == "mlp" else {}
    return cfg.backbone, {**kwargs, **cfg.backbone_params}


def _summary(m: dict) -> dict:
    return {k: round(float(m[k]), 4) for k in REPORTED}


def format_table(before: dict, after: dict) -> str:
    lines = [f"{'metric':<16}{'raw pixels':>12}{'learned':>12}", "-" * 40]
    for k in REPORTED:
        lines.append(f"{k:<16}{before[k]:>12.4f}{after[k]:>12.4f}")
    return "\n".join(lines)


def _write_history(path: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buf.getvalue().encode())


def _plots(run_dir: Path, history: list[dict], emb: np.ndarray, labels: np.ndarray) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from sklearn.manifold import TSNE

    fig, ax1 = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history]
    ax1.plot(epochs, [r["loss"] for r in history], color="tab:blue", label="training loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss", color="tab:blue")
    if "map_at_r" in history[0]:
        ax2 = ax1.twinx()
        ax2.plot(epochs, [r["map_at_r"] for r in history], color="tab:orange", label="validation MAP@R")
        ax2.set_ylabel("validation MAP@R", color="tab:orange")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)

    # t-SNE keeps neighbourhoods, which is what a metric is judged on (a linear PCA view merges
    # classes that are well separated in the full embedding); subsample large sets to stay quick
    keep = np.random.default_rng(0).permutation(len(emb))[:3000]
    emb, labels = emb[keep], np.asarray(labels)[keep]
    perplexity = float(min(30, max(2, (len(emb) - 1) // 3)))
    xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=0).fit_transform(emb)
    codes, classes = encode_labels(labels)
    fig, ax = plt.subplots(figsize=(6, 6))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=codes, cmap="tab10" if len(classes) <= 10 else "tab20", s=8)
    if len(classes) <= 20:
        ax.legend(sc.legend_elements()[0], [str(c) for c in classes], title="class", fontsize=7, loc="best")
    ax.set_title("test-split embeddings (t-SNE)")
    fig.tight_layout()
    fig.savefig(run_dir / "embedding.png", dpi=100)
    plt.close(fig)
    return ["curves.png", "embedding.png"]


CHECKPOINTS = "checkpoints"
SETTINGS_FILE = "train.json"


def resume_config(run_dir) -> TrainConfig:
    """The settings of an interrupted ``metrix train --checkpoint-every`` run, for ``--resume``."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINTS / SETTINGS_FILE
    if not path.is_file():
        if (run_dir / "model.safetensors").is_file():
            raise ValueError(f"{run_dir} is a finished run; there is nothing to resume")
        raise FileNotFoundError(f"{run_dir} has no checkpoints to resume from ({path} is missing); "
                                "start the run with --checkpoint-every N to make it resumable")
    settings = load_json(path)
    with reading(path, "training settings"):
        cfg = TrainConfig(**settings)
        cfg.validate()
    return cfg


def train(cfg: TrainConfig, echo=print, resume: str | Path | None = None) -> dict:
    """Run the whole job; returns ``{"run_dir", "before", "after", "seconds"}``.

    With ``cfg.checkpoint_every`` (the default) the run folder is created at the start and gets resumable
    checkpoints in ``checkpoints/``; ``resume`` (a run folder) continues such a run to the same final weights.
    Ctrl-C raises ``KeyboardInterrupt`` with a message that says how to resume.

    Inside a torch.distributed process group (``metrix train --nproc N``, torchrun) every rank trains its
    share (:class:`~metrix.training.Trainer`); rank 0 alone reports, writes the run and scores the test set,
    and the other ranks return ``{"run_dir": ..., "before": None, "after": None, ...}``.
    """
    writes = distributed.get_rank() == 0
    if not writes:
        echo = _quiet
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    run_dir = None
    if resume is not None:
        run_dir = Path(resume)
        echo(f"resuming {run_dir} from its last checkpoint")
    ds = load_dataset(cfg.data, cfg.label_column, None if cfg.image_size is None else tuple(cfg.image_size))
    X_train, y_train, X_test, y_test, how = _train_test(ds, cfg)
    classes = np.unique(y_train)
    echo(f"data: {ds.name}, {len(ds)} samples, {len(classes)} classes, input shape {tuple(ds.X.shape[1:])}; "
         f"train {len(X_train)} / test {len(X_test)} ({how})")

    # part of the training split monitors each epoch and picks the best epoch; the test split stays unseen
    # (with split="classes", validation is on classes of its own too: what is monitored is transfer)
    disjoint = cfg.split == "classes"
    fit_idx, val_idx = np.arange(len(X_train)), None
    if cfg.val_size > 0:
        fit_idx, val_idx = (class_split if disjoint else stratified_split)(y_train, cfg.val_size, cfg.seed)
    codes = np.zeros(len(y_train), dtype=np.int64)
    codes[fit_idx], fit_classes = encode_labels(y_train[fit_idx])
    model_options, metric = GEOMETRIES[cfg.geometry]
    backbone, backbone_kwargs = _backbone(cfg)
    # pretrained backbones normalise images their own way
    standardize = {} if backbone in PRETRAINED_BACKBONES else input_statistics(X_train[fit_idx])
    # a pretrained backbone refuses inputs that are not images as it is built
    model = EmbeddingModel(backbone, cfg.embedding_dim, input_shape=tuple(ds.X.shape[1:]), **model_options,
                           backbone_kwargs=backbone_kwargs, **standardize, head_hidden_dim=cfg.head_hidden_dim,
                           output=cfg.model_output)
    if backbone in PRETRAINED_BACKBONES and (float(X_train.min()) < 0 or float(X_train.max()) > 1):
        raise ValueError(f"--backbone {cfg.backbone} takes images in [0, 1]; --data {cfg.data} has values in "
                         f"[{float(X_train.min()):g}, {float(X_train.max()):g}]")
    augment = None
    if cfg.augment:
        if len(ds.X.shape) not in (3, 4):
            raise ValueError(f"--augment works on images; --data {cfg.data} has samples of shape {tuple(ds.X.shape[1:])}")
        augment = ImageAugment(seed=cfg.seed)
    loss = build_loss(cfg.loss, num_classes=len(fit_classes), embedding_dim=cfg.embedding_dim, **_loss_kwargs(cfg))
    miner = None if cfg.miner is None else lookup("miners", cfg.miner).factory(**cfg.miner_params)
    val = None
    if val_idx is not None:  # unseen validation classes retrieve among themselves
        val = ((X_train[val_idx], y_train[val_idx]) if disjoint else
               (X_train[val_idx], y_train[val_idx], X_train[fit_idx], y_train[fit_idx]))
    checkpoint_dir = None
    if cfg.checkpoint_every or resume is not None:
        if run_dir is None:
            if writes:
                run_dir = new_run_dir(cfg.out, cfg.name or f"{ds.name}-{cfg.loss}")
                save_json(run_dir / CHECKPOINTS / SETTINGS_FILE, dataclasses.asdict(cfg))
            run_dir = Path(distributed.broadcast_object(str(run_dir)))  # the folder rank 0 chose
        checkpoint_dir = run_dir / CHECKPOINTS
    trainer = Trainer(
        model, loss, epochs=cfg.epochs, lr=cfg.lr, loss_lr=cfg.loss_lr, weight_decay=cfg.weight_decay,
        classes_per_batch=min(cfg.classes_per_batch, len(fit_classes)), samples_per_class=cfg.samples_per_class,
        patience=cfg.patience, seed=cfg.seed, progress=cfg.progress, metric=metric,
        checkpoint_dir=checkpoint_dir, checkpoint_every=cfg.checkpoint_every or 1, miner=miner,
        freeze_backbone=cfg.freeze_backbone, unfreeze_after=cfg.unfreeze_after,
        backbone_lr_scale=cfg.backbone_lr_scale, precision=cfg.precision, augment=augment,
        freeze_batchnorm=cfg.freeze_batchnorm,
        device=distributed.rank_device(check_device(cfg.device)),
    )
    world = distributed.get_world_size()
    p, k = distributed.global_batch_shape(trainer.classes_per_batch, cfg.samples_per_class, len(fit_classes), world)
    hands_on = "" if cfg.model_output == "head" else f"; the run embeds with the backbone's {model.output_dim}-d features"
    echo(f"training: {cfg.backbone} → {cfg.embedding_dim}-d ({cfg.geometry}), loss {cfg.loss}, {cfg.epochs} epochs, "
         f"{p}×{k} batches" + (f" over {world} processes" if world > 1 else "") + hands_on)
    try:
        history = trainer.fit(X_train[fit_idx], codes[fit_idx], val=val, resume=resume is not None)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_how_to_resume(run_dir, trainer)) from None
    if trainer.best_epoch is not None:
        echo(f"best validation {trainer.monitor} {trainer.best_value:.4f} at epoch {trainer.best_epoch}")
    if not writes:
        return {"run_dir": run_dir, "before": None, "after": None, "seconds": time.perf_counter() - started}

    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731  raw-pixel baseline on flattened inputs
    label = (lambda what: what) if cfg.progress else (lambda what: None)  # noqa: E731
    if disjoint:  # unseen classes: the test set retrieves among itself (self excluded)
        before = retrieval_metrics(flat(X_test), y_test, progress=label("raw pixels"))
        emb_test = model.embed(X_test)
        after = retrieval_metrics(emb_test, y_test, metric=metric, progress=label("learned"))
    else:
        before = retrieval_metrics(flat(X_test), y_test, flat(X_train), y_train, progress=label("raw pixels"))
        emb_test, emb_train = model.embed(X_test), model.embed(X_train)
        after = retrieval_metrics(emb_test, y_test, emb_train, y_train, metric=metric, progress=label("learned"))

    if run_dir is None:
        run_dir = new_run_dir(cfg.out, cfg.name or f"{ds.name}-{cfg.loss}")
    save_model(model, run_dir, {
        "train": dataclasses.asdict(cfg), "classes": [c.item() if hasattr(c, "item") else c for c in classes],
        "split": {"test_size": cfg.test_size, "seed": cfg.seed, "data": cfg.data, "test_data": cfg.test_data,
                  "protocol": cfg.split,
                  "test_classes": sorted({c.item() if hasattr(c, "item") else c for c in y_test}, key=str)},
        "best_epoch": trainer.best_epoch, "world_size": world,
    })
    save_json(run_dir / "metrics.json", {"before": before, "after": after}, checksum=False)
    _write_history(run_dir / "history.csv", history)
    written = ["model.safetensors", "config.json", "metrics.json", "history.csv"]
    written += [f"{CHECKPOINTS}/"] if checkpoint_dir is not None else []
    written += _plots(run_dir, history, emb_test.numpy(), y_test)
    seconds = time.perf_counter() - started
    echo("")
    echo(format_table(before, after))
    echo("")
    echo(f"wrote {run_dir}/: {', '.join(written)}" + ("" if "curves.png" in written else
         "  (install metrix[plots] for curves.png and embedding.png)"))
    echo(f"done in {seconds:.1f}s")
    return {"run_dir": run_dir, "before": before, "after": after, "seconds": seconds}


def _quiet(*args, **kwargs) -> None:
    """The report of a rank other than 0: rank 0 speaks for all."""


def _how_to_resume(run_dir: Path | None, trainer: Trainer) -> str:
    saved = trainer.saved_epoch
    if saved is None and run_dir is not None and (run_dir / CHECKPOINTS / LAST_FILE).is_file():
        # Ctrl-C landed between a checkpoint's rename and the trainer noting it: the file on disk is the truth
        try:
            saved = int(load_tagged(run_dir / CHECKPOINTS / LAST_FILE, CHECKPOINT_TAG, "checkpoint")[1]["next_epoch"])
        except (OSError, ValueError, KeyError):
            saved = None
    if saved is None:
        return "interrupted before the first checkpoint: nothing to resume" + (
            "" if run_dir is not None else " (checkpoints are off: --checkpoint-every 0)")
    world = distributed.get_world_size()
    return (f"interrupted; {run_dir} holds a checkpoint after epoch {saved} of {trainer.epochs}: "
            f"resume with 'metrix train --resume {run_dir}{f' --nproc {world}' if world > 1 else ''}'")


def _train_test(ds, cfg: TrainConfig):
    """``(X_train, y_train, X_test, y_test, how)``: the official test set given by ``cfg.test_data``, or a
    stratified split of ``ds``."""
    if cfg.test_data:
        test = load_dataset(cfg.test_data, cfg.label_column, None if cfg.image_size is None else tuple(cfg.image_size))
        if test.X.shape[1:] != ds.X.shape[1:]:
            raise ValueError(f"--test-data {cfg.test_data!r} has samples of shape {test.X.shape[1:]}, "
                             f"--data {cfg.data!r} of shape {ds.X.shape[1:]}; they must match")
        return ds.X, ds.y, test.X, test.y, f"test set {cfg.test_data}"
    if cfg.split == "classes":
        train_idx, test_idx = class_split(ds.y, cfg.test_size, cfg.seed)
        n_test = len(np.unique(ds.y[test_idx]))
        return (ds.X[train_idx], ds.y[train_idx], ds.X[test_idx], ds.y[test_idx],
                f"class-disjoint, {n_test} unseen test classes, seed {cfg.seed}")
    train_idx, test_idx = stratified_split(ds.y, cfg.test_size, cfg.seed)
    return (ds.X[train_idx], ds.y[train_idx], ds.X[test_idx], ds.y[test_idx],
            f"stratified, seed {cfg.seed}")


def _load_for(run: Run, spec: str, label_column: str):
    ds = load_at_run_size(run, spec, label_column)
    return ds.X, ds.y


def _eval_split(run: Run, data: str | None, split: str, label_column: str):
    config = run.config
    spec = data or config["split"]["data"]
    test_data = config["split"].get("test_data")
    if split == "auto":
        split = "test" if spec == config["split"]["data"] else "all"
    if split == "test" and test_data:  # the run's official test set queries its training data
        xt, yt = _load_for(run, test_data, label_column)
        if config["split"].get("protocol") == "classes":  # ... or, with unseen classes, itself
            return (xt, yt, None, None), split
        return (xt, yt, *_load_for(run, spec, label_column)), split
    X, y = _load_for(run, spec, label_column)
    if split == "test" and config["split"].get("protocol") == "classes":  # unseen classes, among themselves
        _, test_idx = class_split(y, config["split"]["test_size"], config["split"]["seed"])
        return (X[test_idx], y[test_idx], None, None), split
    if split == "test":
        train_idx, test_idx = stratified_split(y, config["split"]["test_size"], config["split"]["seed"])
        return (X[test_idx], y[test_idx], X[train_idx], y[train_idx]), split
    if split == "all":
        return (X, y, None, None), split
    raise ValueError(f"split must be 'auto', 'test' or 'all', got {split!r}")


def evaluate(run: Run | str | Path, data: str | None = None, split: str = "auto", label_column: str = "label") -> dict:
    """Re-evaluate a saved run. ``split="test"`` recreates the run's own test-vs-train split;
    ``"all"`` scores every sample against all others; ``"auto"`` picks ``test`` for the run's own data."""
    run = as_run(run)
    (xq, yq, xr, yr), used = _eval_split(run, data, split, label_column)
    metrics = retrieval_metrics(run.embed(xq, progress="embedding queries"),
                                yq, None if xr is None else run.embed(xr, progress="embedding references"), yr,
                                metric=run.metric, progress="retrieval")
    metrics["split"] = used
    return metrics


def embed(run: Run | str | Path, data: str, out, label_column: str = "label") -> tuple[Path, int]:
    """Embed every sample of ``data`` with a saved run and write a ``.npy`` (labels beside it)."""
    run = as_run(run)
    x, labels = _load_for(run, data, label_column)
    emb = run.embed(x).numpy()
    out = Path(out)
    buf = io.BytesIO()
    np.save(buf, emb, allow_pickle=False)
    atomic_write_bytes(out, buf.getvalue())
    if labels.dtype.kind in "iuU":
        buf = io.BytesIO()
        np.save(buf, labels, allow_pickle=False)
        atomic_write_bytes(out.with_name(out.stem + "_labels.npy"), buf.getvalue())
    return out, emb.shape[1]


def build_index(run: Run | str | Path, data: str, out, backend: str = "exact", faiss_index: str = "Flat",
                label_column: str = "label", metric: str | None = None):
    """Embed a gallery with a saved run and index it (ids = row numbers, metadata = labels).

    ``metric``: how the index compares (a name of :data:`metrix.index.INDEX_METRICS`); default the run's own.
    On the unit sphere euclidean, sqeuclidean, cosine and dot rank alike (only the reported values differ);
    a run trained on the Poincaré ball is searched with its own distance only."""
    from metrix.index import VectorIndex

    run = as_run(run)
    metric = run.metric if metric is None else metric
    if (metric == "poincare") != (run.metric == "poincare"):
        raise ValueError(f"this run compares with {run.metric!r}: index it with --metric {run.metric}"
                         + ("" if run.metric == "poincare" else " (or sqeuclidean, cosine, dot)"))
    x, y = load_inputs(data, label_column)
    x = at_run_size(run, x)
    emb = run.embed(x, progress="embedding").numpy()
    index = VectorIndex(emb.shape[1], metric=metric, backend=backend, faiss_index=faiss_index)
    index.provenance = {"run": run.fingerprint}
    # each item says where it came from (DATA#i), so that `metrix explain --index` can show why it matched
    metadata = [{"source": f"{data}#{i}"} for i in range(len(emb))]
    if y is not None:
        for m, v in zip(metadata, y):
            m["label"] = v.item() if hasattr(v, "item") else v
    index.add(emb, metadata=metadata)
    if backend == "faiss":
        index.search(emb[:1], 1)  # build (and train) now so the saved file holds the structure
    index.save(out)
    return index


def search_index(index_path, run: Run | str | Path, query: str, k: int = 10, label_column: str = "label",
                 limit: int | None = None, allow_other_run: bool = False):
    """Embed queries with a saved run and search an index; returns one result dict per query. An index
    built with another run is refused unless ``allow_other_run``."""
    from metrix.index import VectorIndex

    index = VectorIndex.load(index_path)
    run = as_run(run)
    if (index.metric == "poincare") != (run.metric == "poincare"):
        raise ValueError(f"the index compares with {index.metric!r} but the run embeds "
                         f"{'into the Poincaré ball' if run.metric == 'poincare' else 'on the unit sphere'}: "
                         "build the index with the same run")
    if run.embedding_dim != index.dim:
        raise ValueError(f"the run embeds into {run.embedding_dim} dimensions but the index holds {index.dim}-d vectors")
    run.check_built_here(index.provenance, "index", allow_other_run)
    x, y = load_inputs(query, label_column)
    if limit is not None:
        x, y = x[:limit], None if y is None else y[:limit]
    x = at_run_size(run, x)  # after the limit: only the queries searched are resized
    dist, ids = index.search(run.embed(x).numpy(), k)
    results = []
    for i, (d_row, id_row) in enumerate(zip(dist, ids)):
        neighbours = []
        for d, j in zip(d_row, id_row):
            meta = index.metadata(int(j)) if j >= 0 else None
            neighbours.append({"id": int(j), "label": None if not meta else meta.get("label"), "distance": float(d)})
        label = None if y is None else (y[i].item() if hasattr(y[i], "item") else y[i])
        results.append({"query": i, "label": label, "neighbours": neighbours})
    return results
