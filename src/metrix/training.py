"""A small, explicit training loop for embedding models.

One model, one loss, one optimizer: no string-keyed dicts of models, no hook towers. What it does:
class-balanced P×K batches, an optimizer over the model *and* the loss's own parameters (proxies,
class weights), a scheduler stepped per epoch, a progress bar with loss and samples/s, retrieval
evaluation on a validation split each epoch, early stopping on a chosen metric, an atomic
best checkpoint and a "last" checkpoint (each one checksummed safetensors file) from which :meth:`Trainer.fit`
with ``resume=True`` continues to bit-identical final weights.

Example
-------
>>> import torch
>>> from metrix.models import EmbeddingModel
>>> from metrix.losses import MultiSimilarityLoss
>>> x, y = torch.randn(64, 10), torch.arange(4).repeat(16)
>>> model = EmbeddingModel("mlp", 8, input_shape=(10,))
>>> history = Trainer(model, MultiSimilarityLoss(), epochs=1, classes_per_batch=4,
...                   samples_per_class=4, progress=False).fit(x, y)
>>> len(history)
1
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from metrix import distributed
from metrix.evaluation import encode_label_tensors
from metrix.io import (CorruptFileError, flatten_state, load_tagged, reading, remove_orphan_temps, save_tagged,
                       unflatten_state)
from metrix.models import MODEL_TAG

LAST_FILE, BEST_FILE, CHECKPOINT_TAG = "last.safetensors", "best.safetensors", "metrix_checkpoint"
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULERS = ("cosine", "none")


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, where: str = "",
                   sync: Callable[[], None] | None = None, scaler: torch.amp.GradScaler | None = None) -> float:
    """Backward pass and one optimiser step; a non-finite loss stops training instead of poisoning the weights.
    ``sync`` runs between the two (e.g. :func:`metrix.distributed.sum_gradients`); ``scaler`` scales the loss
    for float16 mixed precision (and skips steps whose gradients overflow)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss became {float(loss)}{' at ' + where if where else ''}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if sync is not None:
        sync()
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return float(loss.detach())


def check_transfer_options(freeze_backbone: bool, unfreeze_after: int | None, backbone_lr_scale: float,
                           precision: str, hands_on_features: bool = False) -> None:
    """The transfer-learning settings of :class:`Trainer` (and ``metrix train``), or the error naming the flag.
    ``hands_on_features``: the model hands on its backbone's features (``output="features"``)."""
    if unfreeze_after is not None and (not freeze_backbone or int(unfreeze_after) < 1):
        raise ValueError(f"--unfreeze-after (unfreeze_after) needs --freeze-backbone (freeze_backbone) and >= 1 "
                         f"epoch, got {unfreeze_after}")
    if hands_on_features and freeze_backbone and unfreeze_after is None:
        raise ValueError("--model-output features (output='features') hands on the backbone's features, which "
                         "--freeze-backbone (freeze_backbone) keeps as they are: training would not change what "
                         "the model hands on; add --unfreeze-after N or hand on the head")
    if not float(backbone_lr_scale) > 0:
        raise ValueError(f"--backbone-lr-scale (backbone_lr_scale) must be > 0, got {backbone_lr_scale}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)} (precision), got {precision!r}")


def _generator_state(augment) -> torch.Tensor | None:
    generator = getattr(augment, "generator", None)
    return generator.get_state() if isinstance(generator, torch.Generator) else None


def _model_config(model: nn.Module) -> dict | None:
    try:
        return model.config()
    except (AttributeError, ValueError):
        return None


class Trainer:
    """Train an embedding model with a metric-learning loss.

    Parameters
    ----------
    model : ``nn.Module`` mapping a batch of inputs to embeddings; one with a ``project`` method
        (``EmbeddingModel(output="features")``) trains on ``project`` and is validated on what it hands on
    loss : a metrix loss (``loss(embeddings, labels)``); its parameters are optimised too
    epochs : maximum number of epochs
    lr, weight_decay : optimiser settings; ``loss_lr`` is the learning rate of the loss's own
        parameters (proxies), default ``lr`` (Proxy-Anchor's paper uses 100 × lr)
    optimizer : ``"adam"``, ``"adamw"``, ``"sgd"`` or ``callable(param_groups) -> Optimizer``
    scheduler : ``"cosine"`` (annealed to 0 over ``epochs``), ``"none"`` or
        ``callable(optimizer) -> LRScheduler`` (stepped once per epoch)
    classes_per_batch, samples_per_class : the P×K batch shape
    monitor, mode : validation metric for early stopping/best checkpoint, and whether higher is better
    patience : stop after this many epochs without improvement (None: never)
    checkpoint_dir : folder of the checkpoints (None: no files): ``last.safetensors`` (everything a resume
        needs, one atomic file) and ``best.safetensors`` (the best epoch's weights)
    checkpoint_every : write ``last.safetensors`` every this many epochs (and after the final one)
    restore_best : after training, load the best epoch's weights back into the model
    seed : seeds torch and the sampler at the start of training
    callbacks : ``callable(trainer, epoch, row)`` run after each epoch (after checkpointing)
    miner : ``miner(embeddings, labels) -> Pairs`` (:mod:`metrix.mining`); its pairs go to the loss as
        ``pairs=``, and its state (random generator, annealing step) is checkpointed
    freeze_backbone : train the head only (``model.backbone`` gets no gradient and keeps its BatchNorm
        statistics: eval mode); with ``unfreeze_after=N`` the backbone trains too from epoch N + 1
    backbone_lr_scale : the backbone's learning rate relative to ``lr`` (fine-tuning a pretrained network
        usually wants it lower than the new head's)
    precision : ``"fp32"``, ``"bf16"`` (CPU or GPU) or ``"fp16"`` (GPU, with loss scaling): the dtype of the
        model's forward pass (mixed precision); weights, optimiser and loss stay float32
    freeze_batchnorm : keep the backbone's BatchNorm layers in eval mode while training (their statistics stay
        the pretrained ones; their scale and shift still learn): the usual way to fine-tune a pretrained network
        on small batches or a new input distribution, whose statistics would otherwise lag behind the weights
    augment : ``callable(batch) -> batch`` applied to each training batch (e.g.
        :class:`metrix.apps.augment.ImageAugment`); a ``generator`` attribute is checkpointed

    Inside a torch.distributed process group of W ranks (``torchrun``; :mod:`metrix.distributed`) each rank
    gets its share of global P×K batches of ``W × classes_per_batch`` classes, the loss and the miner see the
    global batch, DDP sums the gradients so that each step is the one-process step on the global batch,
    validation is sharded over the ranks, and only rank 0 writes checkpoints and shows progress. A resume
    needs the world size the run was started with.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        *,
        epochs: int = 20,
        lr: float = 1e-3,
        loss_lr: float | None = None,
        weight_decay: float = 1e-4,
        optimizer: str | Callable = "adam",
        scheduler: str | Callable = "cosine",
        classes_per_batch: int = 16,
        samples_per_class: int = 4,
        monitor: str = "map_at_r",
        mode: str = "max",
        patience: int | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 1,
        restore_best: bool = True,
        seed: int = 0,
        metric: str = "euclidean",
        progress: bool = True,
        device: str | torch.device = "cpu",
        callbacks: Sequence[Callable] = (),
        miner: Callable | None = None,
        freeze_backbone: bool = False,
        unfreeze_after: int | None = None,
        backbone_lr_scale: float = 1.0,
        precision: str = "fp32",
        augment: Callable | None = None,
        freeze_batchnorm: bool = False,
    ):
        if int(epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)} or a callable, got {optimizer!r}")
        if isinstance(scheduler, str) and scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS} or a callable, got {scheduler!r}")
        self.device = torch.device(device)
        self.model, self.loss = model.to(self.device), loss.to(self.device)
        self.epochs, self.lr, self.weight_decay = int(epochs), float(lr), float(weight_decay)
        self.loss_lr = self.lr if loss_lr is None else float(loss_lr)
        self.classes_per_batch, self.samples_per_class = int(classes_per_batch), int(samples_per_class)
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        if int(checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1 epoch, got {checkpoint_every}")
        self.checkpoint_every = int(checkpoint_every)
        self.restore_best, self.seed, self.metric = restore_best, int(seed), metric
        self.progress, self.callbacks, self.miner = progress, list(callbacks), miner
        check_transfer_options(freeze_backbone, unfreeze_after, backbone_lr_scale, precision,
                               getattr(model, "output", "head") == "features")
        self.freeze_backbone, self.unfreeze_after = bool(freeze_backbone), unfreeze_after
        self.backbone_lr_scale = float(backbone_lr_scale)
        self.freeze_batchnorm = bool(freeze_batchnorm)
        if ((self.freeze_backbone or self.freeze_batchnorm or self.backbone_lr_scale != 1.0)
                and not isinstance(getattr(model, "backbone", None), nn.Module)):
            raise ValueError("freeze_backbone, freeze_batchnorm and backbone_lr_scale need a model with a .backbone "
                             "(an EmbeddingModel)")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (loss scaling); on CPU use bf16")
        self.precision, self.augment = precision, augment
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.optimizer = self._build_optimizer(optimizer)
        self.scheduler = self._build_scheduler(scheduler)
        self.history: list[dict] = []
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self._bad_epochs = 0
        self._best_state: dict | None = None
        self.saved_epoch: int | None = None  # epochs done in the last checkpoint written (or resumed from)

    # ------------------------------------------------------------------ set-up
    def _build_optimizer(self, optimizer):
        split = self.freeze_backbone or self.backbone_lr_scale != 1.0
        backbone = list(self.model.backbone.parameters()) if split else []
        mine = {id(p) for p in backbone}
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad and id(p) not in mine],
                   "lr": self.lr}]
        if backbone:  # frozen ones too: they get gradients once unfrozen (until then Adam skips them)
            groups.append({"params": backbone, "lr": self.lr * self.backbone_lr_scale})
        loss_params = [p for p in self.loss.parameters() if p.requires_grad]
        if loss_params:
            groups.append({"params": loss_params, "lr": self.loss_lr})
        if callable(optimizer):
            return optimizer(groups)
        return OPTIMIZERS[optimizer](groups, lr=self.lr, weight_decay=self.weight_decay)

    def _build_scheduler(self, scheduler):
        if callable(scheduler):
            return scheduler(self.optimizer)
        if scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.epochs)
        return None

    # --------------------------------------------------------------- training
    def fit(self, x, y, val: tuple | None = None, resume: bool = False) -> list[dict]:
        """Train on ``(x, y)``; ``val`` is ``(xq, yq)`` (self-retrieval) or ``(xq, yq, xr, yr)``.

        With ``resume=True`` and a ``last`` checkpoint in ``checkpoint_dir``, continue from it.
        Returns the history: one dict per epoch (loss, lr, samples/s, validation metrics).
        """
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
        (codes,) = encode_label_tensors(y)
        if len(codes) != len(x):
            raise ValueError(f"x has {len(x)} rows but y has {len(codes)} labels")
        if len(torch.unique(codes)) < 2:
            raise ValueError("training needs at least 2 classes")
        if val is not None and len(val) not in (2, 4):
            raise ValueError("val must be (x, y) or (query_x, query_y, reference_x, reference_y)")
        sampler = distributed.DistributedClassBalancedBatchSampler(
            codes.numpy(), self.classes_per_batch, self.samples_per_class, seed=self.seed, replacement=True
        )
        start_epoch = 0
        torch.manual_seed(self.seed)
        if resume:
            start_epoch = self._load_last()
        elif self.checkpoint_dir is not None and self._writes:
            remove_orphan_temps(self.checkpoint_dir)
        trainable = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            with distributed.global_batchnorm(self.model):  # batch statistics of the global batch
                history = self._fit(x, codes, sampler, val, start_epoch)
        finally:  # a frozen backbone is handed back as it came
            for p, flag in trainable:
                p.requires_grad_(flag)
        if self.restore_best and self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        return history

    def frozen(self, epoch: int) -> bool:
        """Whether the backbone is frozen in ``epoch`` (0-based)."""
        return self.freeze_backbone and (self.unfreeze_after is None or epoch < int(self.unfreeze_after))

    def _step_module(self, frozen: bool):
        for p in self.model.backbone.parameters() if self.freeze_backbone else ():
            p.requires_grad_(not frozen)
        # model and loss in one DDP module (proxies stay in sync); the loss and the miner see the global batch.
        # DDP tracks the parameters that need gradients when it is built: rebuilt when the backbone unfreezes
        step = distributed.TrainStep(self.model, self.loss, self.miner, PRECISIONS[self.precision])
        return distributed.wrap_model(step, self.device)

    def _fit(self, x, codes, sampler, val, start_epoch) -> list[dict]:
        step, step_frozen = None, None
        bar = tqdm(total=(self.epochs - start_epoch) * len(sampler), desc="training", unit="batch",
                   disable=not (self.progress and self._writes), dynamic_ncols=True)
        for epoch in range(start_epoch, self.epochs):
            sampler.set_epoch(epoch)
            if step is None or self.frozen(epoch) != step_frozen:
                step_frozen = self.frozen(epoch)
                step = self._step_module(step_frozen)
            row = self._train_epoch(step, x, codes, sampler, epoch, bar)
            if val is not None:
                row.update(self.evaluate(*val))
                if self.monitor in row:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.0f}",
                                    **{self.monitor: f"{row[self.monitor]:.4f}"})
            self.history.append(row)
            stop = self._track_best(epoch, row)
            last = stop or epoch + 1 == self.epochs
            if self.checkpoint_dir is not None and (last or (epoch + 1) % self.checkpoint_every == 0):
                self._save_last(self.epochs if stop else epoch + 1)  # an early stop is final: resume finds it done
            for callback in self.callbacks:
                callback(self, epoch, row)
            if stop:
                break
        bar.close()
        return self.history

    @property
    def _writes(self) -> bool:
        """Whether this process writes files and shows progress (rank 0 of a process group, or the only one)."""
        return distributed.get_rank() == 0

    def _train_epoch(self, step, x, codes, sampler, epoch, bar) -> dict:
        self.model.train()
        self.loss.train()
        if self.frozen(epoch):
            self.model.backbone.eval()  # a frozen backbone keeps its BatchNorm statistics (and drops no units)
        elif self.freeze_batchnorm:
            for module in self.model.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        total, n_seen, started = 0.0, 0, time.perf_counter()
        global_batch = sampler.classes_per_batch * sampler.samples_per_class
        for batch in sampler:
            idx = torch.as_tensor(batch)
            xb, yb = x[idx].to(self.device), codes[idx].to(self.device)
            if self.augment is not None:
                xb = self.augment(xb)
            value = optimizer_step(step(xb, yb), self.optimizer, f"epoch {epoch + 1}", scaler=self.scaler)
            total += value * global_batch
            n_seen += global_batch
            bar.update(1)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        elapsed = time.perf_counter() - started
        return {"epoch": epoch + 1, "loss": total / max(n_seen, 1), "lr": lr,
                "samples_per_s": n_seen / elapsed, "seconds": elapsed}

    def evaluate(self, xq, yq, xr=None, yr=None) -> dict:
        """Retrieval metrics of the current model (query vs reference, or query vs itself); in a process
        group each rank embeds and searches its share, and every rank gets the metrics of all queries."""
        eq = distributed.embed_sharded(self.model, xq)
        er = None if xr is None else distributed.embed_sharded(self.model, xr)
        return distributed.sharded_retrieval_metrics(eq, yq, er, yr, metric=self.metric)

    # ------------------------------------------------------- best / early stop
    def _track_best(self, epoch, row) -> bool:
        if self.monitor not in row:
            return False
        value = float(row[self.monitor])
        better = self.best_value is None or (value > self.best_value if self.mode == "max" else value < self.best_value)
        if better:
            self.best_value, self.best_epoch, self._bad_epochs = value, epoch + 1, 0
            self._best_state = copy.deepcopy(self.model.state_dict())
            if self.checkpoint_dir is not None and self._writes:
                self._save_best()
        else:
            self._bad_epochs += 1
        return self.patience is not None and self._bad_epochs >= self.patience

    def _save_best(self):
        save_tagged(self.checkpoint_dir / BEST_FILE, self.model.state_dict(), MODEL_TAG, {
            "model": _model_config(self.model), "epoch": self.best_epoch,
            "monitor": self.monitor, "value": self.best_value,
        })

    # ------------------------------------------------------------- resuming
    def _save_last(self, next_epoch: int):
        """One file holds everything a resume needs (weights, optimiser, scheduler, RNG, history), so a kill
        at any moment leaves either the previous checkpoint or this one, never a mix of two epochs.
        In a process group every rank's random state is kept (rank 0 writes)."""
        rng = distributed.rng_states()
        self.saved_epoch = next_epoch
        if self._writes:
            self._write_last(next_epoch, rng)
        distributed.barrier()  # the checkpoint exists for every rank once it is on disk (a resume may read it next)

    def _write_last(self, next_epoch: int, rng: torch.Tensor) -> None:
        state = {
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "best_state": self._best_state,
            "rng": rng,  # (world size, state): one row per rank
            "miner": None if self.miner is None else self.miner.state_dict(),
            "augment": _generator_state(self.augment),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
        }
        tensors, tree = flatten_state(state, "s")
        save_tagged(self.checkpoint_dir / LAST_FILE, tensors, CHECKPOINT_TAG, {
            "tree": tree, "next_epoch": next_epoch, "history": self.history, "best_value": self.best_value,
            "best_epoch": self.best_epoch, "bad_epochs": self._bad_epochs, "epochs": self.epochs,
        })

    def _load_last(self) -> int:
        if self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        if self._writes:
            remove_orphan_temps(self.checkpoint_dir)
        path = self.checkpoint_dir / LAST_FILE
        if not path.exists():
            return 0  # nothing to resume: a fresh start
        tensors, meta = load_tagged(path, CHECKPOINT_TAG, "training checkpoint")
        with reading(path, "training checkpoint"):
            if int(meta["epochs"]) != self.epochs:
                raise CorruptFileError(f"{path} was written for {meta['epochs']} epochs, this trainer runs "
                                       f"{self.epochs}; resume with the same settings")
            state = unflatten_state(meta["tree"], tensors)
            self.model.load_state_dict(state["model"])
            self.loss.load_state_dict(state["loss"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state["scheduler"] is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self._best_state = state["best_state"]
            distributed.set_rng_state(state["rng"], path)
            if self.miner is not None and state.get("miner") is not None:
                self.miner.load_state_dict(state["miner"])
            if state.get("augment") is not None and _generator_state(self.augment) is not None:
                self.augment.generator.set_state(state["augment"])
            if self.scaler is not None and state.get("scaler") is not None:
                self.scaler.load_state_dict(state["scaler"])
            self.history = list(meta["history"])
            self.best_value, self.best_epoch = meta["best_value"], meta["best_epoch"]
            self._bad_epochs = int(meta["bad_epochs"])
            self.saved_epoch = int(meta["next_epoch"])
            return self.saved_epoch
