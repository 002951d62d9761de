"""A vector index with ids, metadata, safe persistence and exact or approximate (faiss) search.

The index keeps a canonical store — vectors, int64 ids, optional JSON metadata per vector — and,
for the ``faiss`` backend, an acceleration structure derived from it (:mod:`metrix.ann`): built at the
first search outside the lock (searches are exact meanwhile), extended in place when vectors are added,
kept across removals (removed vectors are excluded by an ID selector; HNSW cannot drop them), rebuilt
only when most of it is removed, and saved with the store.

Metrics (names of :data:`metrix.distances.METRICS`): ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` (cosine
distance ``1 − cos``), ``"poincare"`` (the Poincaré-ball distance of curvature −1; vectors must lie inside the
unit ball), all "smaller is closer"; ``"dot"`` (inner product, a similarity: "larger is closer", results sorted
descending). A Mahalanobis metric is the Euclidean distance after its map: index ``x Lᵀ``. faiss searches a
Poincaré index by inner product over ``D + 2`` augmented coordinates whose product is
``−w_x·w_y·‖x − y‖²`` (``w = 1/(1 − ‖x‖²)``), a score that ranks exactly as the distance does.

Example
-------
>>> import numpy as np
>>> index = VectorIndex(dim=4, metric="euclidean")
>>> index.add(np.eye(4, dtype=np.float32), ids=[10, 11, 12, 13], metadata=[{"label": i} for i in "abcd"])
>>> dist, ids = index.search(np.eye(4, dtype=np.float32)[:1], k=2)
>>> int(ids[0, 0]), index.metadata(10)
(10, {'label': 'a'})
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import torch

from metrix.ann import FaissStructure, require_faiss
from metrix.io import CorruptFileError, check_provenance, load_tensors, reading, save_tensors
from metrix.distances import ball_factor, check_metric, poincare
from metrix.neighbors import (DEFAULT_MAX_MEMORY_MB, KNN_METRICS, PreparedReference, iter_knn, poincare_from_score, poincare_rows,
                              prepare_reference)

INDEX_FORMAT = "2"  # 2: metric names of metrix.distances (format 1 said "l2" and "ip")
INDEX_METRICS = KNN_METRICS
BACKENDS = ("exact", "faiss")



def _as_matrix(x, dim: int, name: str, check_input: bool = True) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 1 and x.shape[0] == dim:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}) for this index, got {tuple(x.shape)}")
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be numeric, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if check_input and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"{name} contains NaN or inf values in {bad} row(s)")
    return x


class VectorIndex:
    """Exact (torch, chunked) or faiss (Flat, IVF, HNSW, PQ) nearest-neighbour index with ids.

    Parameters
    ----------
    dim : vector dimension
    metric : ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"``, ``"dot"`` or ``"poincare"``
    backend : ``"exact"`` or ``"faiss"`` (needs the ``faiss`` extra)
    faiss_index : a faiss ``index_factory`` string, e.g. ``"Flat"``, ``"IVF1024,Flat"``, ``"HNSW32"``,
        ``"IVF1024,PQ16"``; IVF indexes are trained on the vectors present at the first search
    nprobe : IVF lists visited per query (recall/speed trade-off)
    ef_search : HNSW candidate list size per query (recall/speed trade-off)
    ef_construction : HNSW candidate list size while building (graph quality; faiss's default is 40)
    """

    def __init__(self, dim: int, metric: str = "euclidean", backend: str = "exact", faiss_index: str = "Flat",
                 nprobe: int = 16, ef_search: int = 64, ef_construction: int = 40,
                 max_memory_mb: float = DEFAULT_MAX_MEMORY_MB):
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if metric == "mahalanobis":
            raise ValueError("index the vectors after the learned map (x @ L.T, or learner.transform(X)) "
                             "with metric='euclidean'")
        check_metric(metric, INDEX_METRICS, "a vector index")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "faiss" and metric == "poincare" and "HNSW" in str(faiss_index):
            # measured: HNSW over the augmented inner product missed 27 of 60 top-5 neighbours at efSearch 128
            raise ValueError("a Poincaré index ranks by an inner product that is not a metric, which HNSW graphs "
                             "search poorly; use faiss_index 'Flat' or an IVF index ('IVF1024,Flat')")
        if backend == "faiss":
            faiss = require_faiss()
            try:  # fail at construction, not at the first search, on a bad factory string
                faiss.index_factory(int(dim), str(faiss_index), faiss.METRIC_L2)
            except RuntimeError as exc:
                raise ValueError(f"faiss cannot build index {faiss_index!r}: {str(exc).splitlines()[0]}") from exc
        self.dim, self.metric, self.backend = int(dim), metric, backend
        self.faiss_index, self.nprobe, self.ef_search = str(faiss_index), int(nprobe), int(ef_search)
        self.ef_construction = int(ef_construction)
        self.max_memory_mb = float(max_memory_mb)
        self._vectors = np.empty((0, self.dim), dtype=np.float32)
        self._n = 0
        self._ids = np.empty(0, dtype=np.int64)
        self._pos: dict[int, int] = {}
        self._meta: list = []
        self._ann: FaissStructure | None = None  # faiss backend: built at the first search, outside the lock
        self._build_log: list | None = None  # changes made while a structure is being built, replayed onto it
        self._prepared: PreparedReference | None = None  # exact search: the store's score rows, until the next write
        self._lock = threading.RLock()
        self.provenance: dict[str, str] = {}  # what made the vectors (e.g. {"run": fingerprint}), saved with them

    # ------------------------------------------------------------------ store
    def __len__(self) -> int:
        return self._n

    @property
    def ids(self) -> np.ndarray:
        return self._ids[: self._n].copy()

    def vectors(self) -> np.ndarray:
        """A copy of the stored vectors (as added; cosine indexes normalise only for search)."""
        with self._lock:
            return self._vectors[: self._n].copy()

    def get(self, ids) -> np.ndarray:
        """Copies of the stored vectors of ``ids`` (an unknown id raises ``KeyError``)."""
        with self._lock:
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            unknown = [int(i) for i in ids if int(i) not in self._pos]
            if unknown:
                raise KeyError(f"ids not in the index: {unknown[:10]}")
            return self._vectors[[self._pos[int(i)] for i in ids]]

    def metadata(self, id_: int):
        with self._lock:
            if int(id_) not in self._pos:
                raise KeyError(f"id {id_} is not in the index")
            return self._meta[self._pos[int(id_)]]

    def add(self, vectors, ids=None, metadata=None, check_input: bool = True) -> np.ndarray:
        """Add vectors; ``ids`` default to consecutive integers after the largest id. Returns the ids.
        ``check_input=False``: the caller checked the vectors for NaN/inf already (shapes are still checked)."""
        x = _as_matrix(vectors, self.dim, "vectors", check_input)
        if self.metric == "poincare":
            ball_factor(torch.from_numpy(x), 1.0, "vectors")  # raises for points on or outside the ball
        n_new = x.shape[0]
        with self._lock:
            if ids is None:
                start = int(self._ids[: self._n].max()) + 1 if self._n else 0
                new_ids = np.arange(start, start + n_new, dtype=np.int64)
            else:
                new_ids = np.asarray(ids)
                if new_ids.dtype.kind not in "iu":
                    raise TypeError(f"ids must be integers, got dtype {new_ids.dtype}")
                if new_ids.size and (int(new_ids.min()) < 0 or int(new_ids.max()) > np.iinfo(np.int64).max):
                    raise ValueError("ids must be between 0 and 2**63 - 1 (negative ids, −1 among them, mark "
                                     "'no result'; larger ones would wrap around)")
                new_ids = new_ids.astype(np.int64).reshape(-1)
                if len(new_ids) != n_new:
                    raise ValueError(f"{n_new} vectors but {len(new_ids)} ids")
                uniq, counts = np.unique(new_ids, return_counts=True)
                if (counts > 1).any():
                    raise ValueError(f"duplicate ids in this call: {uniq[counts > 1][:10].tolist()}")
                clash = [int(i) for i in new_ids if int(i) in self._pos]
                if clash:
                    raise ValueError(f"ids already in the index: {clash[:10]}")
            if metadata is not None:
                metadata = list(metadata)
                if len(metadata) != n_new:
                    raise ValueError(f"{n_new} vectors but {len(metadata)} metadata entries")
                try:
                    json.dumps(metadata)
                except TypeError as exc:
                    raise TypeError(f"metadata must be JSON-serialisable: {exc}") from exc
            self._grow(self._n + n_new)
            self._vectors[self._n : self._n + n_new] = x
            self._ids = np.concatenate([self._ids[: self._n], new_ids])
            for offset, i in enumerate(new_ids):
                self._pos[int(i)] = self._n + offset
            self._meta.extend(metadata if metadata is not None else [None] * n_new)
            self._prepared = None
            if self._ann is not None:
                self._ann.add(self._search_space(x, data=True), new_ids)
            if self._build_log is not None:
                self._build_log.append(("add", new_ids))
            self._n += n_new
            return new_ids

    def _grow(self, needed: int) -> None:
        if needed <= self._vectors.shape[0]:
            return
        capacity = max(needed, 2 * self._vectors.shape[0], 1024)
        grown = np.empty((capacity, self.dim), dtype=np.float32)
        grown[: self._n] = self._vectors[: self._n]
        self._vectors = grown

    def remove(self, ids) -> int:
        """Remove vectors by id; unknown ids raise ``KeyError`` and nothing is removed."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        with self._lock:
            unknown = [int(i) for i in ids if int(i) not in self._pos]
            if unknown:
                raise KeyError(f"ids not in the index: {unknown[:10]}")
            keep = np.ones(self._n, dtype=bool)
            keep[[self._pos[int(i)] for i in ids]] = False
            self._vectors = self._vectors[: self._n][keep]  # a compact copy; add() grows it again
            self._ids = self._ids[: self._n][keep]
            self._meta = [m for m, k in zip(self._meta, keep) if k]
            self._n = len(self._ids)
            self._pos = {int(i): p for p, i in enumerate(self._ids)}
            self._prepared = None
            if self._ann is not None:  # the structure keeps its slots; removed ones are excluded from searches
                self._ann.remove(ids)
                if self._ann.needs_rebuild():
                    self._ann = None
            if self._build_log is not None:
                self._build_log.append(("remove", ids))
            return int((~keep).sum())

    # ----------------------------------------------------------------- search
    def _search_space(self, x: np.ndarray, data: bool = False) -> np.ndarray:
        """Vectors as faiss and the range search see them (stored ``data`` or queries)."""
        if self.metric == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            return x / np.maximum(norms, 1e-12)
        if self.metric == "poincare":
            return np.ascontiguousarray(poincare_rows(torch.from_numpy(x), left=not data).numpy())
        return x

    @property
    def _euclid(self) -> bool:
        """faiss compares by L2 (Euclidean family) or by inner product (everything else)."""
        return self.metric in ("euclidean", "sqeuclidean")

    def _faiss_dim(self) -> int:
        return self.dim + (2 if self.metric == "poincare" else 0)

    def _ensure_structure(self) -> None:
        """Build the faiss structure if there is none, *outside* the lock: the build (minutes for HNSW at a
        million vectors) blocks neither searches, which use exact search meanwhile, nor writes, which are
        logged and replayed onto the new structure before it is installed."""
        with self._lock:
            if self.backend != "faiss" or self._ann is not None or self._build_log is not None or self._n == 0:
                return
            self._build_log = []
            data, ids = self._vectors[: self._n], self._ids[: self._n].copy()  # add/remove never write into this view
        try:
            built = FaissStructure.build(self.faiss_index, self._faiss_dim(), self._euclid,
                                         self._search_space(data, data=True), ids, self.ef_construction)
        except BaseException:
            with self._lock:
                self._build_log = None
            raise
        with self._lock:
            for op, op_ids in self._build_log:
                if op == "remove":
                    built.remove(op_ids)
                    continue
                present = [int(i) for i in op_ids if int(i) in self._pos and not built.holds(i)]
                if present:
                    rows = self._vectors[[self._pos[i] for i in present]]
                    built.add(self._search_space(rows, data=True), np.asarray(present, dtype=np.int64))
            self._ann, self._build_log = built, None

    def _check_query(self, queries, k=None, check_input: bool = True) -> np.ndarray:
        q = _as_matrix(queries, self.dim, "queries", check_input)
        if len(q) == 0:
            raise ValueError("queries is empty: give at least one query vector")
        if self._n == 0:
            raise ValueError("the index is empty: add vectors before searching")
        if k is not None and not 1 <= int(k) <= self._n:
            raise ValueError(f"k must be between 1 and the index size {self._n}, got {k}")
        return q

    def search(self, queries, k: int = 10, nprobe: int | None = None,
               ef_search: int | None = None, check_input: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest vectors of each query: ``(distances, ids)``, both (n_queries, k).

        Approximate backends may find fewer than ``k``; missing slots have id −1 and distance inf
        (−inf for ``dot``). ``nprobe`` / ``ef_search`` override the index's settings for this call only.
        While the faiss structure is first being built, searches are answered exactly. ``check_input=False``:
        the caller checked the queries for NaN/inf already.
        """
        self._ensure_structure()
        with self._lock:
            q = self._check_query(queries, k, check_input)
            if self._ann is None:
                dist, pos = [], []
                for _, d, p in iter_knn(q, None, int(k), self.metric, False, self.max_memory_mb,
                                        prepared=self._prepared_reference(), check_input=False):
                    dist.append(d.numpy())
                    pos.append(p.numpy())
                dist, pos = np.concatenate(dist), np.concatenate(pos)
                ids = self._ids[pos]
            else:
                raw, ids = self._ann.search(self._search_space(q), int(k), self.faiss_index, *self._knobs(nprobe, ef_search))
                dist = self._from_faiss(raw, ids)
            return dist.astype(np.float32), ids.astype(np.int64)

    def _prepared_reference(self) -> PreparedReference:
        """The store made ready for exact search, kept until the next write (most of a single query's cost)."""
        if self._prepared is None:
            # the store holds only vectors that add() or load() checked: no NaN scan per write
            self._prepared = prepare_reference(self._vectors[: self._n], self.metric, check_input=False)
        return self._prepared

    def _knobs(self, nprobe, ef_search) -> tuple[int, int]:
        nprobe = self.nprobe if nprobe is None else int(nprobe)
        ef_search = self.ef_search if ef_search is None else int(ef_search)
        if nprobe < 1 or ef_search < 1:
            raise ValueError(f"nprobe and ef_search must be >= 1, got {nprobe} and {ef_search}")
        return nprobe, ef_search

    def _from_faiss(self, raw: np.ndarray, pos: np.ndarray) -> np.ndarray:
        missing = np.inf if self.metric != "dot" else -np.inf
        if self.metric == "euclidean":
            out = np.sqrt(np.maximum(raw, 0))
        elif self.metric == "sqeuclidean":
            out = np.maximum(raw, 0)
        elif self.metric == "cosine":
            out = 1.0 - raw
        elif self.metric == "poincare":
            out = poincare_from_score(torch.from_numpy(raw)).numpy()
        else:
            out = raw.copy()
        out[pos < 0] = missing
        return out

    def range_search(self, queries, radius: float, nprobe: int | None = None,
                     ef_search: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """All vectors within ``radius`` of each query (distance ≤ radius; for ``dot``: similarity ≥ radius).

        Returns one ``(distances, ids)`` pair per query, nearest first.
        """
        radius = float(radius)
        if not math.isfinite(radius):
            raise ValueError(f"radius must be a finite number, got {radius}")
        self._ensure_structure()
        with self._lock:
            q = self._check_query(queries)
            if self._ann is not None:
                return self._faiss_range(q, radius, *self._knobs(nprobe, ef_search))
            if self.metric == "poincare":  # the distance itself, not the augmented score
                data, qs = torch.from_numpy(self._vectors[: self._n]), torch.from_numpy(q)
            else:
                data = torch.from_numpy(self._search_space(self._vectors[: self._n], data=True))
                qs = torch.from_numpy(self._search_space(q))
            out = []
            chunk = max(1, int(self.max_memory_mb * 2**20 // (8 * self._n)))
            for start in range(0, len(q), chunk):
                block = qs[start : start + chunk]
                if self._euclid:
                    mat = torch.cdist(block, data)
                    mat = mat.square_() if self.metric == "sqeuclidean" else mat
                elif self.metric == "cosine":
                    mat = 1.0 - block @ data.T
                elif self.metric == "poincare":
                    mat = poincare(block, data)
                else:
                    mat = block @ data.T
                for row in mat:
                    hit = row >= radius if self.metric == "dot" else row <= radius
                    pos = torch.nonzero(hit).flatten()
                    vals = row[pos]
                    order = torch.argsort(vals, descending=self.metric == "dot")
                    out.append((vals[order].numpy(), self._ids[pos[order].numpy()]))
            return out

    def _faiss_range(self, q: np.ndarray, radius: float, nprobe: int, ef_search: int):
        if self._euclid:
            threshold = radius * radius if self.metric == "euclidean" else radius
        elif self.metric == "cosine":
            threshold = 1.0 - radius
        elif self.metric == "poincare":  # d ≤ r ⇔ z ≤ cosh r − 1 = 2 sinh²(r/2) ⇔ score = −z/2 ≥ −sinh²(r/2)
            threshold = -float(np.sinh(radius / 2)) ** 2
        else:
            threshold = radius
        lims, raw, ids = self._ann.range_search(self._search_space(q), threshold, self.faiss_index, nprobe, ef_search)
        out = []
        for i in range(len(q)):
            r, p = raw[lims[i] : lims[i + 1]], ids[lims[i] : lims[i + 1]]
            d = self._from_faiss(r, p)
            order = np.argsort(-d if self.metric == "dot" else d, kind="stable")
            out.append((d[order].astype(np.float32), p[order]))
        return out

    # ------------------------------------------------------------ persistence
    def config(self) -> dict:
        return {"dim": self.dim, "metric": self.metric, "backend": self.backend, "faiss_index": self.faiss_index,
                "nprobe": self.nprobe, "ef_search": self.ef_search, "ef_construction": self.ef_construction}

    def save(self, path, key: bytes | str | None = None, header: dict[str, str] | None = None) -> Path:
        """Write the index to one safetensors file (atomic, checksummed, no pickle; signed with ``key``).
        ``header``: more string entries for the file's header (what a gallery stores beside its index)."""
        with self._lock:
            tensors = {
                "vectors": torch.from_numpy(self._vectors[: self._n]),  # views: save_tensors streams them out
                "ids": torch.from_numpy(self._ids[: self._n]),
                "metadata_json": torch.frombuffer(bytearray(json.dumps(self._meta).encode()), dtype=torch.uint8),
            }
            if self._ann is not None:  # the structure with its slots, so a load does not rebuild it
                faiss = require_faiss()
                tensors["faiss"] = torch.from_numpy(faiss.serialize_index(self._ann.index))
                tensors["faiss_slot_ids"] = torch.from_numpy(self._ann.slot_ids)
                tensors["faiss_dead_slots"] = torch.tensor(sorted(self._ann.dead), dtype=torch.int64)
            own = {"kind": "metrix.VectorIndex", "index_format": INDEX_FORMAT, "config": json.dumps(self.config()),
                   "provenance": json.dumps(self.provenance)}
            return save_tensors(path, tensors, {**(header or {}), **own}, key=key)

    @classmethod
    def load(cls, path, key: bytes | str | None = None) -> "VectorIndex":
        """Load an index saved by :meth:`save`; a damaged, forged or inconsistent file raises
        ``CorruptFileError`` (every header field is checked against the stored vectors before any index
        structure is built). ``key``: the key the file was signed with, if any."""
        return cls.load_with_header(path, key)[0]

    @classmethod
    def load_with_header(cls, path, key: bytes | str | None = None) -> tuple["VectorIndex", dict[str, str]]:
        """:meth:`load`, and the file's header entries (those a caller added with ``save(header=...)``)."""
        tensors, header = load_tensors(path, key=key)
        if header.get("kind") != "metrix.VectorIndex":
            raise CorruptFileError(f"{path} is not a metrix vector index (kind {header.get('kind')!r})")
        if header.get("index_format") != INDEX_FORMAT:
            raise CorruptFileError(f"{path} has index format {header.get('index_format')!r}; this metrix reads "
                                   f"{INDEX_FORMAT!r}: build the index again (metrix index build)")
        with reading(path, "vector index"):
            config = json.loads(header["config"])
            vectors, ids, meta_bytes = tensors["vectors"], tensors["ids"], tensors["metadata_json"]
            known = {"vectors", "ids", "metadata_json", "faiss", "faiss_slot_ids", "faiss_dead_slots"}
            if set(tensors) - known or ("faiss" in tensors) != ("faiss_slot_ids" in tensors):
                raise CorruptFileError(f"{path}: unexpected or missing tensors ({sorted(tensors)})")
            if (vectors.dtype != torch.float32 or vectors.ndim != 2 or ids.dtype != torch.int64 or ids.ndim != 1
                    or meta_bytes.dtype != torch.uint8 or meta_bytes.ndim != 1):
                raise CorruptFileError(f"{path}: vectors, ids or metadata have the wrong type or rank")
            if not isinstance(config, dict) or config.get("dim") != vectors.shape[1] or vectors.shape[0] != len(ids):
                raise CorruptFileError(f"{path}: the header's dimension {config.get('dim') if isinstance(config, dict) else None} "
                                       f"does not match the stored vectors {tuple(vectors.shape)} and {len(ids)} ids")
            for name in ("nprobe", "ef_search", "ef_construction"):
                if type(config.get(name)) is not int or config[name] < 1:
                    raise CorruptFileError(f"{path}: invalid {name} {config.get(name)!r}")
            index = cls(**config)
            index.provenance = check_provenance(json.loads(header.get("provenance", "{}")), path)
            vectors, ids = vectors.numpy(), ids.numpy()
            meta = json.loads(bytes(meta_bytes.numpy()).decode())
        if not isinstance(meta, list) or len(meta) != len(ids) or len(np.unique(ids)) != len(ids) or bool((ids < 0).any()):
            raise CorruptFileError(f"{path}: vectors {vectors.shape}, {len(ids)} ids and metadata entries disagree")
        if not all(np.isfinite(vectors[s : s + 65536]).all() for s in range(0, len(vectors), 65536)):  # chunks: no
            raise CorruptFileError(f"{path}: the stored vectors contain NaN or infinity")  # full-size bool temporary
        index._vectors, index._n = vectors, len(ids)  # the loaded buffer is the store: no second copy
        index._ids = ids
        index._pos = {int(i): p for p, i in enumerate(ids.tolist())}
        index._meta = meta
        if "faiss" in tensors:
            index._ann = index._checked_structure(tensors, path)
        return index, header

    def _checked_structure(self, tensors: dict, path) -> FaissStructure:
        """Deserialise a stored faiss structure and check it against the store: its size, dimension and
        metric, its slots' ids (every stored id held by exactly one live slot), and, for a flat structure,
        a sample of its vectors against the stored ones."""
        faiss = require_faiss()
        try:
            index = faiss.deserialize_index(np.ascontiguousarray(tensors["faiss"].numpy()))
        except RuntimeError as exc:
            raise CorruptFileError(f"{path}: the faiss structure does not deserialise: {str(exc).splitlines()[0]}") from exc
        slot_ids = tensors["faiss_slot_ids"].numpy()
        dead = tensors.get("faiss_dead_slots", torch.zeros(0, dtype=torch.int64)).numpy()
        metric = faiss.METRIC_L2 if self._euclid else faiss.METRIC_INNER_PRODUCT
        if index.ntotal != len(slot_ids) or index.d != self._faiss_dim() or index.metric_type != metric:
            raise CorruptFileError(f"{path}: the faiss structure ({index.ntotal} vectors of dimension {index.d}, "
                                   f"metric {index.metric_type}) disagrees with its {len(slot_ids)} slots, dimension "
                                   f"{self._faiss_dim()} and metric {metric}")
        if slot_ids.ndim != 1 or dead.ndim != 1 or (len(dead) and (dead.min() < 0 or dead.max() >= len(slot_ids))):
            raise CorruptFileError(f"{path}: invalid faiss slot table")
        live = np.delete(slot_ids, dead)
        if len(live) != self._n or not np.array_equal(np.sort(live), np.sort(self._ids[: self._n])):
            raise CorruptFileError(f"{path}: the faiss structure's live slots do not hold exactly the stored ids")
        structure = FaissStructure(index, slot_ids, dead)
        flat = faiss.downcast_index(index)
        if isinstance(flat, faiss.IndexFlat) and self._n:  # a flat structure must hold exactly the stored vectors
            slots = np.setdiff1d(np.unique(np.linspace(0, len(slot_ids) - 1, min(len(slot_ids), 256)).astype(np.int64)), dead)
            held = np.stack([flat.reconstruct(int(i)) for i in slots])
            rows = self._vectors[[self._pos[int(i)] for i in slot_ids[slots]]]
            if not np.array_equal(held, self._search_space(rows, data=True).astype(np.float32)):
                raise CorruptFileError(f"{path}: the faiss structure's vectors differ from the stored ones")
        return structure
