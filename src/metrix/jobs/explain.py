"""What ``metrix explain`` does: explain a pair, or a query and its nearest items in a dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from metrix.explain import explain_pair, plot_pairs
from metrix.runs import Run, as_run, at_run_size, load_at_run_size


def pick(spec: str, run: Run):
    """One input from ``spec``: ``DATA#i`` (sample i of a dataset name, folder or file), a ``.npy`` of one
    sample, or — for a text run — the text itself."""
    if run.kind == "text":
        if not spec.strip():
            raise ValueError("give a non-empty text")
        return spec, None
    from metrix.datasets import load_dataset

    if "#" in spec:
        data, _, index = spec.rpartition("#")
        if not index.isdigit():
            raise ValueError(f"{spec!r}: the part after '#' must be a sample number")
        ds = load_dataset(data)
        if not int(index) < len(ds.X):
            raise ValueError(f"{data} has {len(ds.X)} samples; {index} is out of range")
        label = ds.y[int(index)]
        return at_run_size(run, ds.X[[int(index)]])[0], label.item() if hasattr(label, "item") else label
    path = Path(spec)
    if path.suffix == ".npy" and path.is_file():
        x = np.load(path, allow_pickle=False)
        if x.ndim >= 2 and x.shape[0] == 1:
            x = x[0]
        return x, None
    raise ValueError(f"{spec!r}: give DATA#i (e.g. digits#7), a .npy file of one sample"
                     + (", or a text (this is a text run)" if run.kind == "text" else ""))


def explain(run, query: str, reference: str | None = None, data: str | None = None, k: int = 3,
            steps: int = 64, out=None, index=None, allow_other_run: bool = False) -> dict:
    """Explain ``query`` against ``reference``, against its ``k`` nearest samples of ``data`` (itself
    excluded), or against its ``k`` nearest items of a saved ``index`` (built by ``metrix index build``, whose
    items record their source); writes a figure to ``out`` when given. Returns JSON-able dicts."""
    run = as_run(run)
    a, a_label = pick(query, run)
    if sum(x is not None for x in (reference, data, index)) != 1:
        raise ValueError("give one of --reference (one pair), --data or --index (the query's nearest samples)")
    if reference is not None:
        b, b_label = pick(reference, run)
        pairs = [(b, b_label, reference)]
    elif index is not None:
        pairs = _index_neighbours(run, a, index, k, allow_other_run)
    else:
        if run.kind == "text":
            raise ValueError("--data takes image or feature datasets; for a text run give --reference")
        from metrix.neighbors import knn

        ds = load_at_run_size(run, data)
        emb = run.embed(ds.X, progress="embedding")
        q = run.embed(np.asarray(a, dtype=np.float32)[None])
        dist, idx = knn(q, emb, k=min(int(k) + 1, len(ds.X)), metric=run.metric)
        chosen = [int(i) for i, d in zip(idx[0], dist[0]) if float(d) > 1e-6][: int(k)]  # not the query itself
        pairs = [(ds.X[i], ds.y[i].item() if hasattr(ds.y[i], "item") else ds.y[i], f"{data}#{i}") for i in chosen]
    results = []
    for b, b_label, name in pairs:
        result = explain_pair(run, a, b, steps)
        result.update(query=query, reference=name, query_label=_plain(a_label), reference_label=_plain(b_label))
        results.append(result)
    if out is not None:
        if run.kind == "text":
            raise ValueError("figures are for image and feature runs; use --json for a text run's token attributions")
        plot_pairs([(a, b, r, r["reference"]) for (b, _, _), r in zip(pairs, results)], out)
    return {"pairs": results}


def _index_neighbours(run, a, index_path, k: int, allow_other_run: bool) -> list:
    """The query's ``k`` nearest items of a saved index, read back from the sources the items record."""
    from metrix.index import VectorIndex

    index = VectorIndex.load(index_path)
    run.check_built_here(index.provenance, "index", allow_other_run)
    dist, ids = index.search(run.embed(np.asarray(a, dtype=np.float32)[None]).numpy(), min(int(k) + 1, len(index)))
    pairs = []
    for i, d in zip(ids[0].tolist(), dist[0].tolist()):
        meta = index.metadata(i) or {}
        if "source" not in meta:
            raise ValueError(f"the items of {index_path} do not record their source: build it again with "
                             "'metrix index build' to explain its results")
        if float(d) > 1e-6 and len(pairs) < int(k):  # not the query itself
            b, b_label = pick(meta["source"], run)
            pairs.append((b, b_label, meta["source"]))
    return pairs


def _plain(label):
    return None if label is None else (label if isinstance(label, (int, float, str)) else str(label))
