"""metrix explain RUN --query A (--reference B | --data DATA -k K | --index INDEX -k K) [--out fig.png] [--json]."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from metrix.cli.common import ALLOW_OTHER_RUN, DEVICE, app, open_run


@app.command("explain")
def explain(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder: deep (metrix train), linear (metrix fit-linear) or text (metrix text train)."),
    query: str = typer.Option(..., help="Input A: DATA#i (sample i of a dataset, e.g. digits#7), a .npy of one sample, or a text for a text run."),
    reference: Optional[str] = typer.Option(None, help="Input B, given the same ways: explain this one pair."),
    data: Optional[str] = typer.Option(None, help="Explain the query against its nearest samples of this dataset instead."),
    index: Optional[Path] = typer.Option(None, help="Or against its nearest items of an index built by 'metrix index build'."),
    k: int = typer.Option(3, "-k", "--k", min=1, max=20, help="Nearest samples to explain, with --data or --index."),
    steps: int = typer.Option(64, min=2, max=1024, help="Integrated-gradients steps (more: smaller completeness error)."),
    out: Optional[Path] = typer.Option(None, help="Write a figure (PNG): inputs, maps, distances; needs the plots extra."),
    as_json: bool = typer.Option(False, "--json", help="Print every number (attributions included) as JSON."),
    allow_other_run: bool = ALLOW_OTHER_RUN,
    device: str = DEVICE,
) -> None:
    """Why two inputs are close: exact per-feature contributions for a linear metric, integrated gradients
    (both sides, completeness error stated) for deep and text runs."""
    from metrix.jobs.explain import explain as run_explain

    result = run_explain(open_run(run, device), query, reference, data, k, steps, out, index, allow_other_run)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for pair in result["pairs"]:
        labels = "" if pair["query_label"] is None else f" (labels {pair['query_label']} / {pair['reference_label']})"
        typer.echo(f"{pair['query']} vs {pair['reference']}{labels}: distance {pair['distance']:.4f}")
        if pair["kind"] == "exact":
            top = sorted(range(len(pair["per_feature"])), key=lambda i: pair["per_feature"][i], reverse=True)[:5]
            typer.echo("  exact: d² = Σ per-feature contributions (error %.1e); largest: %s" % (
                pair["sum_error"], ", ".join(f"#{i} {pair['per_feature'][i]:.3f}" for i in top)))
        else:
            for side in ("a", "b"):
                s = pair[side]
                typer.echo(f"  {side.upper()}: similarity {s['similarity']:.4f} vs baseline {s['baseline_similarity']:.4f}; "
                           f"attributions sum to the difference within {s['completeness_error']:.1e}")
    if out is not None:
        typer.echo(f"wrote {out}")
