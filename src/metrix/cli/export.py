"""metrix export RUN --out model.pt [--format torchscript|onnx]."""

from __future__ import annotations

from pathlib import Path

import typer

from metrix.cli.common import app, open_run


@app.command("export")
def export(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder written by 'metrix train'."),
    out: Path = typer.Option(..., help="The model file to write."),
    fmt: str = typer.Option("torchscript", "--format", help="torchscript (torch.jit.load) or onnx (ONNX Runtime; needs the onnx extra); no metrix needed to use either."),
) -> None:
    """Export a trained model with its input standardisation and final normalisation inside."""
    from metrix.jobs.export import export as run_export

    r = run_export(open_run(run, "cpu"), out, fmt)
    typer.echo(f"wrote {r['out']} ({r['format']}): inputs {r['input_shape']} → {r['embedding_dim']}-d embeddings "
               f"compared with {r['metric']}; matches the run within {r['max_difference']:.1e}")
