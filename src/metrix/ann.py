"""The faiss structure behind a ``VectorIndex(backend="faiss")``: slots, removals and search parameters.

faiss numbers the vectors of a structure by the order they were added ("slots"). The structure here keeps
the id of every slot and the set of slots whose vectors were removed since. Removed slots are excluded
from every search by an ID selector, so a removal never discards the structure. This matters for HNSW,
whose graph cannot drop a vector and takes minutes to rebuild at a million vectors. The structure is
rebuilt only once most of its slots are dead.

Search parameters (``nprobe``, ``efSearch``) are passed with each search, not set on the shared
structure, so concurrent searches with different settings cannot race (faiss #2204).
"""

from __future__ import annotations

import numpy as np

REBUILD_DEAD_FRACTION = 0.5  # past this share of removed slots, searching them costs more than a rebuild


def require_faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the faiss backend needs the 'faiss' extra: pip install 'metrix[faiss]' (faiss-cpu)"
        ) from exc
    return faiss


def _numpy_method(index, name: str):
    """faiss's own NumPy ``search`` / ``range_search``: importing ``faiss.contrib.torch_utils`` (as
    pytorch-metric-learning does) replaces them with wrappers that take no ``params`` and keeps the
    originals as ``search_numpy`` / ``range_search_numpy``."""
    return getattr(index, f"{name}_numpy", None) or getattr(index, name)


class FaissStructure:
    """A faiss index over slots, with the id held in each slot and the slots removed since."""

    def __init__(self, index, slot_ids: np.ndarray, dead=()):
        self.index = index
        self._slot_ids = np.asarray(slot_ids, dtype=np.int64).copy()
        self.dead: set[int] = {int(s) for s in dead}
        self._slot_of = {int(i): s for s, i in enumerate(self._slot_ids.tolist()) if s not in self.dead}

    @classmethod
    def build(cls, factory: str, dim: int, metric_l2: bool, data: np.ndarray, ids: np.ndarray,
              ef_construction: int) -> "FaissStructure":
        """Train (IVF, PQ) and fill a new structure from ``data`` (already in search space)."""
        faiss = require_faiss()
        index = faiss.index_factory(dim, factory, faiss.METRIC_L2 if metric_l2 else faiss.METRIC_INNER_PRODUCT)
        if hasattr(faiss.downcast_index(index), "hnsw"):
            faiss.downcast_index(index).hnsw.efConstruction = int(ef_construction)
        if not index.is_trained:
            nlist = getattr(faiss.extract_index_ivf(index), "nlist", 1) if "IVF" in factory else 1
            if len(data) < nlist:
                raise ValueError(f"{factory} needs at least {nlist} vectors to train, the index has {len(data)}")
            index.train(data)
        index.add(data)
        return cls(index, ids)

    @property
    def slot_ids(self) -> np.ndarray:
        return self._slot_ids

    @property
    def live(self) -> int:
        return len(self._slot_of)

    def holds(self, id_: int) -> bool:
        return int(id_) in self._slot_of

    def needs_rebuild(self) -> bool:
        return len(self.dead) > REBUILD_DEAD_FRACTION * max(1, len(self._slot_ids))

    def add(self, data: np.ndarray, ids: np.ndarray) -> None:
        """Append vectors (in search space) with their ids; slots continue after the current ones."""
        start = len(self._slot_ids)
        self.index.add(data)
        self._slot_ids = np.concatenate([self._slot_ids, np.asarray(ids, dtype=np.int64)])
        for offset, i in enumerate(np.asarray(ids).tolist()):
            self._slot_of[int(i)] = start + offset

    def remove(self, ids) -> None:
        """Mark the slots of ``ids`` dead (ids the structure does not hold are ignored)."""
        for i in np.asarray(ids).reshape(-1).tolist():
            slot = self._slot_of.pop(int(i), None)
            if slot is not None:
                self.dead.add(slot)

    def _params(self, factory: str, nprobe: int, ef_search: int):
        faiss = require_faiss()
        kwargs = {}
        if self.dead:  # the Python side must keep both selectors alive for as long as faiss uses them
            kwargs["batch"] = faiss.IDSelectorBatch(np.fromiter(sorted(self.dead), dtype=np.int64))
            kwargs["sel"] = faiss.IDSelectorNot(kwargs["batch"])
        sel = {"sel": kwargs["sel"]} if self.dead else {}
        if "IVF" in factory:
            params = faiss.SearchParametersIVF(nprobe=int(nprobe), **sel)
        elif "HNSW" in factory:
            params = faiss.SearchParametersHNSW(efSearch=int(ef_search), **sel)
        else:
            params = faiss.SearchParameters(**sel)
        return params, kwargs  # the caller holds the selector (and its batch) alive while faiss searches

    def search(self, queries: np.ndarray, k: int, factory: str, nprobe: int, ef_search: int):
        """``(raw scores, ids)``; slots that could not be filled have id −1."""
        params, _alive = self._params(factory, nprobe, ef_search)
        raw, slots = _numpy_method(self.index, "search")(queries, int(k), params=params)
        return raw, self._ids_of(slots)

    def range_search(self, queries: np.ndarray, threshold: float, factory: str, nprobe: int, ef_search: int):
        """``(lims, raw scores, ids)`` as faiss's range search returns them."""
        params, _alive = self._params(factory, nprobe, ef_search)
        lims, raw, slots = _numpy_method(self.index, "range_search")(queries, threshold, params=params)
        return lims, raw, self._ids_of(slots)

    def _ids_of(self, slots: np.ndarray) -> np.ndarray:
        return np.where(slots >= 0, self._slot_ids[np.clip(slots, 0, None)], -1)
