"""The long-lived service object behind ``metrix serve``: one trained run, a durable store, and the in-memory
indexes derived from it.

Every write goes to the store first — one transaction, durable when it returns — and then to the in-memory
index, both under the collection's write lock, so the index always equals the store's committed rows (and is
rebuilt from them at start-up). Searches take no write lock: the index's own lock makes a search see a write
entirely or not at all, and per-call search parameters (``nprobe``, ``ef_search``) are never index state that
concurrent requests could race on.

Example
-------
>>> svc = Service(Run.open("runs/digits-ntxent"), SQLiteStore("store"))          # doctest: +SKIP
>>> svc.create_collection("digits", kind="collection")                           # doctest: +SKIP
>>> svc.upsert("digits", [{"id": "0", "input": x0.tolist()}])                     # doctest: +SKIP
>>> svc.search("digits", {"input": x0.tolist()}, k=5)                             # doctest: +SKIP
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import threading
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from metrix.apps.verification import GALLERY_METRICS, Gallery, calibrate_threshold, roc_curve, verification_metrics
from metrix.distances import check_metric
from metrix.index import INDEX_METRICS, VectorIndex
from metrix.serve.batching import MicroBatcher
from metrix.serve.store import CollectionInfo, SQLiteStore

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
INDEX_TYPES = ("exact", "faiss:Flat", "faiss:HNSW32", "faiss:IVF256,Flat")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the HTTP layer adds body size and concurrency)."""

    max_batch: int = 256  # inputs or items per request
    max_k: int = 1000
    max_body_bytes: int = 8 * 2**20
    max_concurrent: int = 32
    max_image_pixels: int = 4096 * 4096


class NotFound(KeyError):
    """An unknown collection, gallery, item or identity (HTTP 404)."""


class Conflict(ValueError):
    """The request contradicts the store's state (HTTP 409)."""


class _Collection:
    """A collection's in-memory side: its index (ids = store seqs) or gallery, and who each entry is."""

    def __init__(self, info: CollectionInfo, since: int = 0):
        self.info, self.since = info, since  # since: the change-feed version this copy already reflects
        self.write_lock = threading.Lock()
        self.entries: dict[int, tuple[str, dict, str | None]] = {}  # seq -> (item id, metadata, label)
        self.index: VectorIndex | None = None
        self.gallery: Gallery | None = None
        self._searcher: MicroBatcher | None = None
        if info.kind == "gallery":
            self.gallery = Gallery(threshold=info.threshold, metric=info.metric)
        else:
            backend, _, factory = info.index_type.partition(":")
            self.index = VectorIndex(info.dim, metric=info.metric, backend=backend, faiss_index=factory or "Flat")

    def count(self) -> int:
        return len(self.entries)

    def searcher(self, settings) -> MicroBatcher | None:
        """The collection's search micro-batcher (started at its first search), or None without batching."""
        if settings is None or self.index is None:
            return None
        if self._searcher is None:  # the lock only for the first search: searches never wait for a write
            with self.write_lock:
                if self._searcher is None:
                    self._searcher = MicroBatcher(self._search_batch, *settings)
        return self._searcher

    def _search_batch(self, payloads: list) -> list:
        """One index search per (nprobe, ef_search) group of waiting queries, each cut to its own k."""
        out: list = [None] * len(payloads)
        groups: dict = {}
        for i, (q, k, nprobe, ef_search) in enumerate(payloads):
            groups.setdefault((nprobe, ef_search), []).append(i)
        for (nprobe, ef_search), members in groups.items():
            n = len(self.index)
            if n == 0:
                for i in members:
                    out[i] = (np.zeros((1, 0), np.float32), np.zeros((1, 0), np.int64))
                continue
            k = min(max(payloads[i][1] for i in members), n)
            queries = np.concatenate([payloads[i][0] for i in members])
            dist, ids = self.index.search(queries, k, nprobe=nprobe, ef_search=ef_search, check_input=False)
            for row, i in enumerate(members):
                own = min(payloads[i][1], n)
                out[i] = (dist[row : row + 1, :own], ids[row : row + 1, :own])
        return out

    def close(self) -> None:
        if self._searcher is not None:
            self._searcher.close()


class Service:
    """One run (or none: precomputed vectors only), its store, and the collections' indexes.

    Parameters
    ----------
    run : a :class:`metrix.runs.Run` whose model embeds raw inputs, or None to accept vectors only
    store : the durable store (rebuilt into memory here)
    limits : per-request limits
    batching : ``(max_batch, max_delay_seconds, max_queue)`` of the embedding micro-batcher; None for none
    search_batching : the same for searches of one collection (queries that arrive together are answered by one
        index search of all of them: one GEMM instead of many scans); None for none
    """

    def __init__(self, run, store: SQLiteStore, limits: Limits = Limits(), batching=(64, 0.005, 256),
                 search_batching=(32, 0.002, 256)):
        self.run, self.store, self.limits = run, store, limits
        self._lock = threading.RLock()  # guards the collections dict
        self._collections: dict[str, _Collection] = {}
        self.search_batching = search_batching
        self.batcher = None
        if run is not None and batching is not None:
            self.batcher = MicroBatcher(self._embed_payloads, *batching)
        self.version = store.version()  # read first: changes after it are applied again, idempotently
        for info in store.collections():
            self._collections[info.name] = self._rebuilt(info, self.version)
        self._sync_lock = threading.Lock()
        self._following: threading.Thread | None = None
        self._stop = threading.Event()
        self.ready = True

    def close(self) -> None:
        self._stop.set()
        if self._following is not None:
            self._following.join(5)
        if self.batcher is not None:
            self.batcher.close()
        with self._lock:
            for coll in self._collections.values():
                coll.close()

    @property
    def dim(self) -> int | None:
        return None if self.run is None else self.run.embedding_dim

    # ---------------------------------------------------------------- inputs
    def _embed_payloads(self, payloads: list) -> list:
        """Embeddings of several requests' inputs (arrays, or lists of texts for a text run) in one model call."""
        sizes = [len(p) for p in payloads]
        if self.run.kind == "text":
            out = self.run.embed([t for p in payloads for t in p]).numpy()
        else:
            out = self.run.embed(np.concatenate(payloads) if len(payloads) > 1 else payloads[0]).numpy()
        return np.split(out, np.cumsum(sizes)[:-1])

    def _decode_image(self, data: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if self.run is None or self.run.input_spec is None:
            raise ValueError("this service's run does not take images; send " +
                             ("vectors" if self.run is None else "'text'"))
        shape = self.run.input_spec.shape
        side = math.isqrt(math.prod(shape)) if len(shape) == 1 else None
        if len(shape) == 3 and shape[0] == 1:
            h, w = shape[1], shape[2]
        elif side is not None and side * side == shape[0]:
            h = w = side
        else:
            raise ValueError(f"this run takes inputs of shape {shape}, not images; send 'input' values")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image must be base64-encoded file bytes (PNG, JPEG, ...)") from None
        try:
            with Image.open(io.BytesIO(raw)) as im:
                if im.width * im.height > self.limits.max_image_pixels:
                    raise ValueError(f"image of {im.width}×{im.height} pixels is larger than the limit "
                                     f"({self.limits.max_image_pixels} pixels)")
                im = im.convert("L").resize((w, h), Image.BILINEAR)
                pixels = np.asarray(im, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ValueError(f"cannot read the image: {exc}") from None
        return pixels.reshape(shape)

    def embed(self, inputs: list[dict]) -> np.ndarray:
        """Embeddings of ``inputs``: each ``{"input": [...]}`` (raw values the run takes), ``{"image": base64}``
        or, for a text run, ``{"text": "..."}``; all through the micro-batcher."""
        if self.run is None:
            raise ValueError("this service was started without a run: it takes precomputed vectors only")
        if not inputs:
            raise ValueError("give at least one input")
        if len(inputs) > self.limits.max_batch:
            raise ValueError(f"{len(inputs)} inputs in one request; the limit is {self.limits.max_batch}")
        if self.run.kind == "text":
            texts = [item.get("text") for item in inputs]
            for i, text in enumerate(texts):
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"input {i}: this run embeds texts: give a non-empty 'text'")
                if len(text) > 100_000:
                    raise ValueError(f"input {i}: a text of {len(text)} characters is over the limit of 100,000")
            return self.batcher(texts) if self.batcher is not None else self.run.embed(texts).numpy()
        rows = []
        for i, item in enumerate(inputs):
            if item.get("image") is not None:
                rows.append(self._decode_image(item["image"]))
            elif item.get("input") is not None:
                rows.append(np.asarray(item["input"], dtype=np.float64).reshape(-1))
            else:
                raise ValueError(f"input {i} has neither 'input' nor 'image'" +
                                 (" (this run embeds raw values, not text)" if item.get("text") is not None else ""))
        size = math.prod(self.run.input_spec.shape)
        flat = []
        for i, r in enumerate(rows):
            r = np.asarray(r, dtype=np.float64).reshape(-1)
            if r.size != size:
                raise ValueError(f"input {i} has {r.size} values; this run takes {size} "
                                 f"(shape {self.run.input_spec.shape})")
            if not np.isfinite(r).all():
                raise ValueError(f"input {i} contains NaN or infinity")
            flat.append(r.astype(np.float32))
        x = np.stack(flat).reshape(len(flat), *self.run.input_spec.shape)
        return self.batcher(x) if self.batcher is not None else self.run.embed(x).numpy()

    def _vectors(self, items: list[dict], dim: int, what: str = "item") -> np.ndarray:
        """One vector per item: its ``vector`` (checked), or the embedding of its ``input``/``image``."""
        out: list = [None] * len(items)
        to_embed = []
        for i, item in enumerate(items):
            if item.get("vector") is not None:  # (a text run's items carry 'text' and are embedded)
                v = np.asarray(item["vector"], dtype=np.float64)
                if v.ndim != 1 or v.shape[0] != dim:
                    raise ValueError(f"{what} {i}: vector has {v.size} values; this collection holds {dim}-d vectors")
                if not np.isfinite(v).all():
                    raise ValueError(f"{what} {i}: vector contains NaN or infinity")
                if np.abs(v).max(initial=0) > 1e18:
                    raise ValueError(f"{what} {i}: vector values must be below 1e18 in magnitude")
                out[i] = v.astype(np.float32)
            else:
                to_embed.append(i)
        if to_embed:
            emb = self.embed([items[i] for i in to_embed])
            if emb.shape[1] != dim:
                raise ValueError(f"the run embeds into {emb.shape[1]} dimensions; this collection holds {dim}")
            for i, e in zip(to_embed, emb):
                out[i] = e
        return np.stack(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)

    # ------------------------------------------------------------ collections
    def _get(self, name: str, kind: str | None = None) -> _Collection:
        with self._lock:
            coll = self._collections.get(name)
        if coll is None or (kind is not None and coll.info.kind != kind):
            raise NotFound(f"no {kind or 'collection'} named {name!r}")
        return coll

    def create_collection(self, name: str, kind: str = "collection", metric: str | None = None,
                          index_type: str = "exact", dim: int | None = None, key_id: str | None = None) -> dict:
        if not NAME.match(str(name)):
            raise ValueError(f"invalid name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
                             "letter or digit")
        if kind not in ("collection", "gallery"):
            raise ValueError(f"kind must be 'collection' or 'gallery', got {kind!r}")
        default = "euclidean" if self.run is None or self.run.metric != "poincare" else "poincare"
        metric = check_metric(metric or default, GALLERY_METRICS if kind == "gallery" else INDEX_METRICS,
                              f"a {kind}")
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
        if kind == "gallery" and index_type != "exact":
            raise ValueError("a gallery searches exactly (index_type 'exact')")
        if dim is None:
            if self.dim is None:
                raise ValueError("give dim: this service has no run to say the embedding size")
            dim = self.dim
        if not isinstance(dim, int) or not 1 <= dim <= 65536:
            raise ValueError(f"dim must be an integer in [1, 65536], got {dim!r}")
        if self.dim is not None and dim != self.dim:
            raise ValueError(f"this service's run embeds into {self.dim} dimensions, not {dim}")
        info = CollectionInfo(name, kind, metric, dim, index_type, None, None)
        coll = _Collection(info)  # builds the index first: a bad faiss setting fails before the store changes
        with self._lock:
            try:
                coll.since = self.store.create_collection(info, audit=(key_id, "create_collection", {"name": name}))
            except FileExistsError:
                raise Conflict(f"a collection named {name!r} exists") from None
            self._collections[name] = coll
        return info.public(0)

    def collections(self) -> list[dict]:
        with self._lock:
            return [c.info.public(c.count()) for c in self._collections.values()]

    def collection(self, name: str) -> dict:
        coll = self._get(name)
        return coll.info.public(coll.count())

    def delete_collection(self, name: str, key_id: str | None = None) -> None:
        coll = self._get(name)
        with coll.write_lock, self._lock:
            self.store.delete_collection(name, audit=(key_id, "delete_collection", {"name": name}))
            self._collections.pop(name, None)
        coll.close()

    def _rebuilt(self, info: CollectionInfo, since: int) -> _Collection:
        coll = _Collection(info, since)
        rows = self.store.items(info.name, info.dim)
        if info.kind == "gallery":
            by_identity: dict[str, list] = {}
            for r in rows:
                by_identity.setdefault(r.label, []).append(r.vector)
            for identity, vectors in by_identity.items():
                coll.gallery.enroll(identity, np.stack(vectors))
        elif rows:
            coll.index.add(np.stack([r.vector for r in rows]), ids=[r.seq for r in rows], check_input=False)
        coll.entries = {r.seq: (r.item_id, r.metadata, r.label) for r in rows}
        return coll

    # ------------------------------------------------------------- replicas
    def follow(self, interval: float = 0.05) -> None:
        """Keep applying the changes other writers make to the store (other replicas, other processes), every
        ``interval`` seconds, in a background thread."""
        if self._following is None:
            def loop():
                while not self._stop.wait(interval):
                    try:
                        self.sync()
                    except Exception:  # noqa: BLE001 - a store that is briefly unreachable: try again next time
                        continue
            self._following = threading.Thread(target=loop, name="metrix-follow", daemon=True)
            self._following.start()

    def sync(self) -> int:
        """Apply every change in the store's feed after the last one applied; returns how many. Idempotent: a
        change this service made itself (already in memory) is skipped."""
        with self._sync_lock:
            changes = self.store.changes_since(self.version)
            adds: dict[str, list[int]] = {}
            for ch in changes:
                if ch.op == "add":
                    adds.setdefault(ch.collection, []).append(ch.seq)
            rows = {}
            for name, seqs in adds.items():
                coll = self._collections.get(name)
                if coll is not None:
                    rows.update({r.seq: r for r in self.store.items_by_seq(name, seqs, coll.info.dim)})
            for ch in changes:
                self._apply(ch, rows)
                self.version = ch.version
            return len(changes)

    def _apply(self, ch, rows: dict) -> None:
        with self._lock:
            coll = self._collections.get(ch.collection)
            if ch.op == "create" and coll is None:
                info = self.store.collection_info(ch.collection)
                if info is not None:
                    self._collections[ch.collection] = self._rebuilt(info, ch.version)
                return
            if ch.op == "drop" and coll is not None and coll.since < ch.version:
                self._collections.pop(ch.collection)
                coll.close()
                return
        if coll is None or coll.since >= ch.version:
            return
        with coll.write_lock:
            if ch.op == "add" and ch.seq not in coll.entries and ch.seq in rows:
                row = rows[ch.seq]
                if coll.gallery is not None:
                    coll.gallery.enroll(row.label, row.vector[None])
                else:
                    coll.index.add(row.vector[None], ids=[row.seq], check_input=False)
                coll.entries[row.seq] = (row.item_id, row.metadata, row.label)
            elif ch.op == "remove" and ch.seq in coll.entries:
                if coll.index is not None:
                    coll.index.remove([ch.seq])
                coll.entries.pop(ch.seq)
            elif ch.op == "remove_label" and coll.gallery is not None and ch.label in coll.gallery.identities:
                coll.gallery.remove(ch.label)
                coll.entries = {s: e for s, e in coll.entries.items() if e[2] != ch.label}
            elif ch.op == "calibrate":
                info = self.store.collection_info(ch.collection)
                if info is not None:
                    coll.info = info
                    coll.gallery.threshold = info.threshold

    # ------------------------------------------------------------------ items
    def upsert(self, name: str, items: list[dict], key_id: str | None = None) -> dict:
        """Insert or replace items (``id``, ``vector`` or ``input``/``image``, ``metadata``, ``label``); durable
        when this returns."""
        self.sync()  # what other writers did first, so that replacing their items finds them here
        coll = self._get(name, "collection")
        if not items:
            raise ValueError("give at least one item")
        if len(items) > self.limits.max_batch:
            raise ValueError(f"{len(items)} items in one request; the limit is {self.limits.max_batch}")
        ids = [str(item.get("id")) if item.get("id") is not None else uuid.uuid4().hex for item in items]
        if len(set(ids)) != len(ids):
            raise ValueError("the request names an item id twice")
        for item_id in ids:
            if not 1 <= len(item_id) <= 256:
                raise ValueError("item ids must have 1 to 256 characters")
        metadata = [item.get("metadata") or {} for item in items]
        for m in metadata:
            if not isinstance(m, dict):
                raise ValueError("metadata must be a JSON object")
        labels = [None if item.get("label") is None else str(item["label"]) for item in items]
        vectors = self._vectors(items, coll.info.dim)
        if coll.info.metric == "poincare" and bool((np.linalg.norm(vectors, axis=1) >= 1).any()):
            raise ValueError("a Poincaré collection holds points inside the unit ball (norm < 1)")
        with coll.write_lock:
            new, old = self.store.upsert(name, ids, vectors, metadata, labels,
                                         audit=(key_id, "upsert", {"collection": name, "ids": ids[:20], "n": len(ids)}))
            coll.index.remove([s for s in old if s in coll.entries])  # (one another replica wrote may not be here yet)
            coll.index.add(vectors, ids=new, check_input=False)
            for seq in old:
                coll.entries.pop(seq, None)
            for seq, item_id, meta, label in zip(new, ids, metadata, labels):
                coll.entries[seq] = (item_id, meta, label)
        return {"upserted": len(ids), "replaced": len(old), "ids": ids}

    def get_item(self, name: str, item_id: str) -> dict:
        coll = self._get(name, "collection")
        row = self.store.get(name, item_id, coll.info.dim)
        if row is None:
            raise NotFound(f"no item {item_id!r} in {name!r}")
        return {"id": row.item_id, "vector": row.vector.tolist(), "metadata": row.metadata, "label": row.label}

    def delete_items(self, name: str, ids: list[str], key_id: str | None = None) -> dict:
        self.sync()
        coll = self._get(name, "collection")
        if not ids or len(ids) > self.limits.max_batch:
            raise ValueError(f"give 1 to {self.limits.max_batch} ids")
        with coll.write_lock:
            removed = self.store.delete_items(name, [str(i) for i in ids],
                                              audit=(key_id, "delete", {"collection": name, "ids": ids[:20]}))
            coll.index.remove([s for s in removed if s in coll.entries])
            for seq in removed:
                coll.entries.pop(seq, None)
        return {"deleted": len(removed)}

    def count(self, name: str) -> int:
        return self._get(name).count()

    # ----------------------------------------------------------------- search
    def _check_k(self, k) -> int:
        if not isinstance(k, int) or not 1 <= k <= self.limits.max_k:
            raise ValueError(f"k must be an integer in [1, {self.limits.max_k}], got {k!r}")
        return k

    def search(self, name: str, query: dict, k: int = 10, filter: dict | None = None, radius: float | None = None,
               nprobe: int | None = None, ef_search: int | None = None) -> list[dict]:
        """The ``k`` nearest items to ``query`` (a ``vector``, ``input`` or ``image``), optionally only those whose
        metadata has every key/value of ``filter``, and only within ``radius``."""
        coll = self._get(name, "collection")
        k = self._check_k(k)
        if filter is not None and not isinstance(filter, dict):
            raise ValueError("filter must be a JSON object of metadata values to match")
        if radius is not None and not (isinstance(radius, (int, float)) and math.isfinite(radius)):
            raise ValueError("radius must be a finite number")
        for name_, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (not isinstance(value, int) or not 1 <= value <= 65536):
                raise ValueError(f"{name_} must be an integer in [1, 65536]")
        q = self._vectors([query], coll.info.dim, "query")
        index = coll.index
        n = len(index)
        if n == 0:
            return []
        if filter:
            hits = self._filtered(coll, q, k, filter)
        elif radius is not None:
            dist, ids = index.range_search(q, float(radius), nprobe=nprobe, ef_search=ef_search)[0]
            hits = list(zip(ids[:k].tolist(), dist[:k].tolist()))
        else:
            searcher = coll.searcher(self.search_batching)
            if searcher is not None:
                dist, ids = searcher.submit((q, k, nprobe, ef_search), size=1).result(60)
            else:
                dist, ids = index.search(q, min(k, n), nprobe=nprobe, ef_search=ef_search, check_input=False)
            hits = [(int(i), float(d)) for i, d in zip(ids[0], dist[0]) if i >= 0]
        if filter and radius is not None:
            similar = coll.info.metric == "dot"
            hits = [(i, d) for i, d in hits if (d >= radius if similar else d <= radius)]
        return self._described(coll, hits)

    def _filtered(self, coll: _Collection, q: np.ndarray, k: int, filter: dict) -> list[tuple[int, float]]:
        """Exact search over the items whose metadata matches ``filter`` (a selective filter would starve an
        approximate search of candidates; this is exact and costs one pass over the matches)."""
        from metrix.distances import is_similarity, pairwise_distance

        entries = list(coll.entries.items())
        seqs = [s for s, (_, meta, _) in entries if all(meta.get(key) == value for key, value in filter.items())]
        if not seqs:
            return []
        vectors = coll.index.get(seqs)
        d = pairwise_distance(torch.from_numpy(q), torch.from_numpy(vectors), coll.info.metric)[0].numpy()
        order = np.argsort(-d if is_similarity(coll.info.metric) else d, kind="stable")[:k]
        return [(seqs[i], float(d[i])) for i in order]

    def _described(self, coll: _Collection, hits) -> list[dict]:
        out = []
        for seq, dist in hits:
            entry = coll.entries.get(int(seq))
            if entry is None:  # removed between the search and here
                continue
            item_id, meta, label = entry
            out.append({"id": item_id, "distance": float(dist), "metadata": meta, "label": label})
        return out

    # ----------------------------------------------------------- verification
    def enroll(self, name: str, identity: str, samples: list[dict], key_id: str | None = None) -> dict:
        """Add samples of ``identity`` to a gallery (a sample it already holds is skipped); durable on return."""
        self.sync()
        coll = self._get(name, "gallery")
        identity = str(identity)
        if not 1 <= len(identity) <= 256:
            raise ValueError("identity must have 1 to 256 characters")
        if not samples or len(samples) > self.limits.max_batch:
            raise ValueError(f"give 1 to {self.limits.max_batch} samples")
        x = self._vectors(samples, coll.info.dim, "sample")
        with coll.write_lock:
            x = coll.gallery.unseen(identity, x)  # the gallery's own rule, applied before the store records them
            if len(x):
                ids = [uuid.uuid4().hex for _ in range(len(x))]
                new, _ = self.store.upsert(name, ids, x, [{}] * len(x), [identity] * len(x),
                                           audit=(key_id, "enroll", {"gallery": name, "identity": identity, "n": len(x)}))
                coll.gallery.enroll(identity, x)
                for seq, item_id in zip(new, ids):
                    coll.entries[seq] = (item_id, {}, identity)
        return {"identity": identity, "added": int(len(x)), "skipped": len(samples) - int(len(x))}

    def remove_identity(self, name: str, identity: str, key_id: str | None = None) -> dict:
        self.sync()
        coll = self._get(name, "gallery")
        with coll.write_lock:
            if identity not in coll.gallery.identities:
                raise NotFound(f"identity {identity!r} is not enrolled in {name!r}")
            removed = self.store.delete_label(name, identity, audit=(key_id, "remove_identity",
                                                                     {"gallery": name, "identity": identity}))
            coll.gallery.remove(identity)
            for seq in removed:
                coll.entries.pop(seq, None)
        return {"identity": identity, "removed": len(removed)}

    def verify(self, name: str, identity: str, probe: dict) -> dict:
        coll = self._get(name, "gallery")
        if coll.gallery.threshold is None:
            raise Conflict(f"gallery {name!r} has no threshold yet: calibrate it first")
        if identity not in coll.gallery.identities:
            raise NotFound(f"identity {identity!r} is not enrolled in {name!r}")
        x = self._vectors([probe], coll.info.dim, "probe")
        accepted, dist = coll.gallery.verify(x, identity)
        return {"identity": identity, "accepted": bool(accepted[0]), "distance": float(dist[0]),
                "threshold": coll.gallery.threshold}

    def identify(self, name: str, probe: dict, k: int = 1) -> dict:
        """The ``k`` closest identities; ``identity`` is ``"unknown"`` beyond the gallery's threshold (open set)."""
        coll = self._get(name, "gallery")
        k = self._check_k(k)
        if not coll.gallery.identities:
            raise Conflict(f"gallery {name!r} is empty: enroll identities first")
        if coll.gallery.threshold is None:
            raise Conflict(f"gallery {name!r} has no threshold yet: calibrate it first (open-set identification "
                           "needs one to answer 'unknown')")
        x = self._vectors([probe], coll.info.dim, "probe")
        result = coll.gallery.identify(x, k=k)[0]
        return {"identity": result["identity"] if result["identity"] is not None else "unknown",
                "candidates": result["candidates"],
                "threshold": coll.gallery.threshold}

    def calibrate(self, name: str, samples: list[dict], target_far: float | None = None,
                  key_id: str | None = None) -> dict:
        """Set the gallery's threshold from held-out labelled samples: every pair of them is a genuine (same
        label) or impostor pair; the threshold meets ``target_far`` (or maximises accuracy), and is stored
        with the ROC summary."""
        coll = self._get(name, "gallery")
        if target_far is not None and not (isinstance(target_far, (int, float)) and 0 < target_far < 1):
            raise ValueError("target_far must be a number in (0, 1)")
        if not 2 <= len(samples) <= max(self.limits.max_batch, 2):
            raise ValueError(f"give 2 to {self.limits.max_batch} labelled samples")
        labels = [s.get("label") for s in samples]
        if any(lab is None for lab in labels):
            raise ValueError("every calibration sample needs a label")
        x = torch.from_numpy(self._vectors(samples, coll.info.dim, "sample"))
        a, b = np.triu_indices(len(labels), 1)
        same = np.asarray([str(labels[i]) == str(labels[j]) for i, j in zip(a, b)])
        d = coll.gallery.pairwise_distances(x, x).numpy()[a, b]
        threshold = float(calibrate_threshold(d, same, target_far))
        summary = {k: v for k, v in verification_metrics(d, same).items() if isinstance(v, (int, float))}
        far, tar, thr = roc_curve(d, same)
        points = np.unique(np.linspace(0, len(far) - 1, min(len(far), 101)).astype(int))  # the ROC, 101 points at most
        summary.update(target_far=target_far, pairs=int(len(d)), genuine=int(same.sum()),
                       roc={"far": far[points].tolist(), "tar": tar[points].tolist(), "threshold": thr[points].tolist()})
        with coll.write_lock:
            self.store.set_calibration(name, threshold, summary,
                                       audit=(key_id, "calibrate", {"gallery": name, "threshold": threshold}))
            coll.gallery.threshold = threshold
            coll.info = CollectionInfo(**{**coll.info.__dict__, "threshold": threshold, "calibration": summary})
        return {"threshold": threshold, "calibration": summary}

    def identities(self, name: str) -> list[str]:
        return list(self._get(name, "gallery").gallery.identities)
