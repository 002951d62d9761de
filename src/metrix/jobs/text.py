"""What ``metrix text train / eval`` do: sentence encoders fine-tuned with metric-learning losses."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from metrix import datasets as d
from metrix.apps.text import SentenceEncoder, fit_labelled, fit_pairs, retrieval_scores, sts_correlation
from metrix.runs import new_run_dir


def task_data(task: str, root=None, download: bool = False):
    """('pairs', train SentencePairs, test SentencePairs) or ('labels', train TextDataset, test TextDataset)."""
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


def scores(encoder, kind, train, test) -> dict:
    """Held-out score: STS Spearman/Pearson for sentence pairs, 1-NN accuracy and MAP@R for labelled texts."""
    if kind == "pairs":
        return sts_correlation(encoder, test.first, test.second, test.scores)
    return retrieval_scores(encoder, train.texts, train.y, test.texts, test.y)


def load_encoder(model: str, max_length: int = 128) -> SentenceEncoder:
    """A saved metrix encoder folder, or a pretrained model (local folder or the offline package)."""
    if (Path(model) / "metrix_text.json").is_file():
        return SentenceEncoder.load(model)
    return SentenceEncoder.from_pretrained(model, max_length=max_length)


def train(task: str, model: str, out, root=None, download: bool = False, loss: str | None = None, epochs: int = 1,
          batch_size: int = 64, lr: float = 2e-5, max_length: int = 128, seed: int = 0, echo=print) -> dict:
    """Fine-tune on the task's training split and save into the run folder ``out`` (new or empty; default
    ``runs/text-<task>``); returns the held-out scores before and after, the training CPU time and the folder."""
    kind, train_set, test_set = task_data(task, root, download)
    run_dir = new_run_dir(out, f"text-{task}")
    encoder = load_encoder(model, max_length)
    before = scores(encoder, kind, train_set, test_set)
    start = time.process_time()
    log = dict(log_every=20, echo=echo, seed=seed, lr=lr, epochs=epochs)
    if kind == "pairs":
        fit_pairs(encoder, train_set.first, train_set.second, train_set.scores, loss or "ranknet",
                  batch_size=max(batch_size // 2, 2), **log)
    else:
        fit_labelled(encoder, train_set.texts, train_set.y, loss or "supcon", batch_size=batch_size, **log)
    cpu = time.process_time() - start
    after = scores(encoder, kind, train_set, test_set)
    encoder.save(run_dir)
    return {"before": before, "after": after, "cpu_seconds": cpu, "out": run_dir}


def evaluate(task: str, model: str, root=None, download: bool = False, max_length: int = 128) -> dict:
    """Held-out scores of an encoder on the task."""
    kind, train_set, test_set = task_data(task, root, download)
    return scores(load_encoder(model, max_length), kind, train_set, test_set)
