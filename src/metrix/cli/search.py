"""metrix index build / search: a vector index of a run's embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from metrix.cli.common import ALLOW_OTHER_RUN, DEVICE, app, command_group, echo_rows, open_run
from metrix.neighbors import KNN_METRICS as INDEX_METRICS


index_app = command_group(help="Build a searchable index of embeddings and query it.")
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    run: Path = typer.Argument(..., help="A run folder written by 'metrix train' (its model embeds the gallery)."),
    data: str = typer.Option(..., help="Gallery to index: 'digits', a folder, .npz, .csv, or a .npy of raw inputs."),
    out: Path = typer.Option(..., help="Index file to write (safetensors, checksummed)."),
    backend: str = typer.Option("exact", help="'exact' (torch) or 'faiss' (needs the faiss extra)."),
    faiss_index: str = typer.Option("HNSW32", help="faiss index factory string for --backend faiss: Flat, HNSW32, IVF1024,Flat, IVF1024,PQ16, ..."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    metric: Optional[str] = typer.Option(None, help=f"How the index compares: {', '.join(INDEX_METRICS)} "
                                                     "(default: the run's own metric)."),
    device: str = DEVICE,
) -> None:
    """Embed a gallery with a trained run and save a vector index of it (ids = row numbers, labels as metadata)."""
    from metrix.jobs.train import build_index

    index = build_index(open_run(run, device), data, out, backend, faiss_index, label_column, metric)
    typer.echo(f"indexed {len(index)} vectors of dimension {index.dim} ({backend}) -> {out}")


@index_app.command("search")
def index_search(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder written by 'metrix train' (or a folder holding one run): its model embeds the queries; the one that built the index."),
    index: Path = typer.Argument(..., help="An index file written by 'metrix index build'."),
    query: str = typer.Option(..., help="Queries: 'digits', a folder, .npz, .csv, or a .npy of raw inputs."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Number of neighbours per query."),
    limit: Optional[int] = typer.Option(None, min=1, help="Search only the first N queries."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    allow_other_run: bool = ALLOW_OTHER_RUN,
    device: str = DEVICE,
) -> None:
    """Embed queries and print their nearest gallery items: ids, labels and distances."""
    from metrix.jobs.train import search_index

    results = search_index(index, open_run(run, device), query, k, label_column, limit, allow_other_run)
    echo_rows(results, as_json, _hits)


def _hits(r: dict) -> str:
    """A query's line and one line per neighbour."""
    head = f"query {r['query']}" + ("" if r["label"] is None else f" (label {r['label']})")
    return "\n".join([head] + [f"  {rank:>3}  id {n['id']:>8}  label {str(n['label']):>10}  distance {n['distance']:.4f}"
                                for rank, n in enumerate(r["neighbours"], start=1)])
