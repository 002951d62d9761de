"""Safe persistence: safetensors for tensors, JSON for everything else, never pickle.

Every file is written atomically (a temporary file in the same folder, fsync, rename, fsync of the
folder), so a crash leaves either the old file or the new one, never a mix. A safetensors file carries
one SHA-256 digest over its whole header (dtypes, shapes, offsets and the JSON metadata that says what
the file is) and its tensor bytes, so a damaged file fails loudly on load (:class:`CorruptFileError`)
instead of producing a silently wrong model, index or gallery. The header is parsed and checked for
consistency with the file's size *before* anything is allocated, and the data is read once into one
buffer that the returned tensors share.

A checksum detects damage, not forgery: whoever can edit a file can recompute it. For files that
cross a trust boundary (a gallery or index handed over by someone else, a service's store), pass a
secret ``key``: the digest becomes an HMAC-SHA256 that only holders of the key can produce, and a
file without a valid one is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

FORMAT_VERSION = "2"  # 2: the digest covers header and data (1 covered the tensors only)
JSON_FORMAT_VERSION = "1"  # checksummed JSON files: the digest has always covered the whole object
_CHECKSUM_KEY = "metrix_sha256"
_HMAC_KEY = "metrix_hmac_sha256"
_VERSION_KEY = "metrix_format"
_DIGEST_PREFIX = b"metrix-safetensors-v2\0"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
_READ_CHUNK = 16 * 2**20

# safetensors dtype codes <-> torch dtypes (the subset metrix writes and reads)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}


class CorruptFileError(ValueError):
    """A saved file failed to parse, its checksum does not match, or its contents are inconsistent."""


@contextmanager
def reading(path, what: str) -> Iterator[None]:
    """Turn any error raised while interpreting a loaded file's contents into :class:`CorruptFileError`
    (a file that passed its checksum but holds a header this metrix cannot use was forged or is from an
    incompatible writer; either way the user gets one clear message, not a ``KeyError`` traceback)."""
    try:
        yield
    except CorruptFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError, RuntimeError,
            OverflowError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path}: not a usable {what} ({type(exc).__name__}: {exc})") from exc


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_for(path: Path) -> tuple[int, str]:
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def _finish_atomic(tmp: str, path: Path) -> Path:
    os.replace(tmp, path)
    _fsync_dir(path.parent)  # the rename itself survives a power cut only once the folder is synced
    return path


def _process_umask() -> int:
    # read once, at import: os.umask can only be read by setting it, which would race with other threads' files
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _process_umask()


def _user_mode(fd: int) -> None:
    """mkstemp creates 0600; a saved model or index gets the permissions of any file the user creates."""
    os.fchmod(fd, 0o666 & ~_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename + fsync of the folder)."""
    return atomic_write_chunks(path, [data])


def atomic_write_chunks(path: str | os.PathLike, chunks) -> Path:
    """Write an iterable of byte chunks to ``path`` atomically, without joining them in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_for(path)
    try:
        _user_mode(fd)
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        return _finish_atomic(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_orphan_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files that a killed atomic write left in ``folder``.

    Only for folders with a single writer (a training run's checkpoints, a run being saved): a temp file
    there is never one that another live writer is about to rename."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype, bfloat16 included)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _new_digest(key: bytes | None):
    return hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _coerce_key(key) -> bytes | None:
    if key is None:
        return None
    key = key.encode() if isinstance(key, str) else bytes(key)
    if len(key) < 16:
        raise ValueError("a signing key must be at least 16 bytes long")
    return key


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 key: bytes | str | None = None) -> Path:
    """Save a flat dict of tensors as one safetensors file whose header carries a digest of the whole file.

    The tensors are hashed and then streamed to disk without an intermediate copy. With ``key`` the
    digest is an HMAC-SHA256 (see the module docstring).
    """
    key = _coerce_key(key)
    clean = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in _CODES:
            raise TypeError(f"cannot save tensor {name!r} of dtype {t.dtype}")
        clean[str(name)] = t
    order = sorted(clean, key=lambda k: (-clean[k].element_size(), k))  # keeps every tensor aligned
    header: dict[str, Any] = {}
    start = 0
    for name in order:
        t = clean[name]
        end = start + t.numel() * t.element_size()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [start, end]}
        start = end
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[_VERSION_KEY] = FORMAT_VERSION
    header["__metadata__"] = meta
    digest = _new_digest(key)
    digest.update(_DIGEST_PREFIX)
    digest.update(_canonical(header))
    for name in order:
        digest.update(_tensor_bytes(clean[name]))
    meta[_HMAC_KEY if key is not None else _CHECKSUM_KEY] = digest.hexdigest()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    chunks = [len(text).to_bytes(8, "little"), text, *(_tensor_bytes(clean[n]) for n in order)]
    return atomic_write_chunks(path, chunks)


def _parse_entries(header: dict, data_size: int, path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """Check every tensor entry (dtype, shape, offsets) against the data section's size; nothing allocated."""
    entries = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise CorruptFileError(f"{path}: malformed header entry for {name!r}")
        dtype, shape, offsets = _DTYPES.get(e["dtype"]), e["shape"], e["data_offsets"]
        if dtype is None:
            raise CorruptFileError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise CorruptFileError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise CorruptFileError(f"{path}: tensor {name!r} has invalid offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            raise CorruptFileError(f"{path}: tensor {name!r} has shape {shape} but {offsets[1] - offsets[0]} bytes")
        entries[name] = (dtype, shape, offsets[0], offsets[1])
    covered = 0
    for _, _, start, end in sorted(entries.values(), key=lambda v: v[2]):
        if start != covered:
            raise CorruptFileError(f"{path}: tensor data overlaps or leaves gaps")
        covered = end
    if covered != data_size:
        raise CorruptFileError(f"{path}: the header describes {covered} bytes of tensors, the file holds {data_size}")
    return entries


def _read_header(fh, size: int, path) -> tuple[dict, int]:
    head = fh.read(8)
    if len(head) < 8:
        raise CorruptFileError(f"{path} is not a safetensors file (only {size} bytes)")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CorruptFileError(f"{path} is not a valid safetensors file (header of {n} bytes in a file of {size})")
    try:
        header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"{path} is not a valid safetensors file: unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path} is not a valid safetensors file: the header is not an object")
    return header, size - 8 - n


def load_tensors(path, key: bytes | str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors saved by :func:`save_tensors`, verifying format version and digest (an HMAC with
    ``key``). The data is read once into a buffer that the returned tensors share."""
    key = _coerce_key(key)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        header, data_size = _read_header(fh, size, path)
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CorruptFileError(f"{path} was not written by metrix (no metadata)")
        version = meta.get(_VERSION_KEY)
        if version != FORMAT_VERSION:
            raise CorruptFileError(
                f"{path} has metrix format version {version!r}; this metrix reads version {FORMAT_VERSION!r}"
                + (" (re-save it with the metrix that wrote it, or retrain)" if version == "1" else "")
            )
        expected = meta.pop(_HMAC_KEY if key is not None else _CHECKSUM_KEY, None)
        if expected is None:
            if key is not None:
                raise CorruptFileError(f"{path} is not signed with a key; refusing it where a signed file is required")
            if _HMAC_KEY in meta:
                raise CorruptFileError(f"{path} is signed: pass the key it was signed with to load it")
            raise CorruptFileError(f"{path} has no checksum; it was not written by metrix")
        meta.pop(_CHECKSUM_KEY, None)
        meta.pop(_HMAC_KEY, None)
        entries = _parse_entries(header, data_size, path)
        digest = _new_digest(key)
        digest.update(_DIGEST_PREFIX)
        digest.update(_canonical({**header, "__metadata__": meta}))
        buf = bytearray(data_size)
        view = memoryview(buf)
        for start in range(0, data_size, _READ_CHUNK):
            part = view[start : start + _READ_CHUNK]
            if fh.readinto(part) != len(part):
                raise CorruptFileError(f"{path} is truncated")
            digest.update(part)
    if not hmac.compare_digest(expected, digest.hexdigest()):
        raise CorruptFileError(f"{path}: checksum mismatch, the file is damaged or was modified")
    tensors = {}
    for name, (dtype, shape, start, end) in entries.items():
        if end == start:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)
    user_meta = {k: v for k, v in meta.items() if k != _VERSION_KEY}
    return tensors, user_meta


def save_tagged(path, tensors: dict[str, torch.Tensor], tag: str, info: dict, key=None) -> Path:
    """:func:`save_tensors` with a JSON ``info`` object under the header key ``tag`` (what the file is)."""
    return save_tensors(path, tensors, metadata={tag: json.dumps(info)}, key=key)


def load_tagged(path, tag: str, what: str, key=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a file written by :func:`save_tagged`; a file without ``tag`` is not a ``what``."""
    tensors, meta = load_tensors(path, key=key)
    if tag not in meta:
        raise CorruptFileError(f"{path} is not a metrix {what}")
    try:
        info = json.loads(meta[tag])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"{path}: unreadable {what} header: {exc}") from exc
    if not isinstance(info, dict):
        raise CorruptFileError(f"{path}: the {what} header is not a JSON object")
    return tensors, info


def file_digest(path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_json(path, obj: dict, checksum: bool = True) -> Path:
    """Save a JSON object atomically; with ``checksum`` a ``metrix_sha256`` field guards it."""
    if not isinstance(obj, dict):
        raise TypeError("save_json expects a dict")
    payload = dict(obj)
    if checksum:
        payload[_VERSION_KEY] = JSON_FORMAT_VERSION
        payload[_CHECKSUM_KEY] = _json_digest({k: v for k, v in payload.items() if k != _CHECKSUM_KEY})
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(path, text.encode())


def load_json(path, checksum: bool = True) -> dict:
    """Load JSON written by :func:`save_json`; with ``checksum`` verify version and checksum."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        obj = json.loads(path.read_bytes().decode())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path} does not hold a JSON object")
    if checksum:
        expected = obj.pop(_CHECKSUM_KEY, None)
        if expected is None:
            raise CorruptFileError(f"{path} has no checksum; it was not written by metrix")
        if expected != _json_digest(obj):
            raise CorruptFileError(f"{path}: checksum mismatch, the file is damaged or was modified")
        version = obj.pop(_VERSION_KEY, None)
        if version != JSON_FORMAT_VERSION:
            raise CorruptFileError(
                f"{path} has metrix format version {version!r}; this metrix reads {JSON_FORMAT_VERSION!r}"
            )
    return obj


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (e.g. an optimizer ``state_dict``) into tensors and a JSON tree.

    Tensors are replaced by ``{"__tensor__": key}`` placeholders; :func:`unflatten_state`
    reverses it. This is how optimizer and RNG state are checkpointed without pickle.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return {"__tensor__": path}
        if isinstance(node, dict):
            if any(not isinstance(k, (str, int)) for k in node):
                raise TypeError(f"cannot serialise dict keys of type {[type(k) for k in node]}")
            return {
                "__dict__": [[k, walk(v, f"{path}.{k}")] for k, v in node.items()]
            }
        if isinstance(node, (list, tuple)):
            items = [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
            return {"__tuple__": items} if isinstance(node, tuple) else items
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot serialise {type(node).__name__} at {path!r}")

    tree = walk(obj, prefix)
    return tensors, tree


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            if tree["__tensor__"] not in tensors:
                raise CorruptFileError(f"saved state refers to a missing tensor {tree['__tensor__']!r}")
            return tensors[tree["__tensor__"]]
        if "__dict__" in tree:
            return {k: unflatten_state(v, tensors) for k, v in tree["__dict__"]}
        if "__tuple__" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        raise CorruptFileError(f"unexpected node in saved state: {sorted(tree)}")
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree


def build_to_fit(build, tensors: dict[str, torch.Tensor], path, what: str, strict: bool = True):
    """``build()`` a module and load ``tensors`` into it, refusing a header that does not fit the weights.

    The module is first built on the ``meta`` device, which allocates nothing, and its parameter and
    buffer shapes are compared with the file's: a header that asks for 3·10⁸ items or a 60000² input
    fails here with :class:`CorruptFileError` instead of allocating gigabytes first.
    """
    with reading(path, what):
        with torch.device("meta"):
            probe = build()
        expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if (expected != found) if strict else any(found.get(k, s) != s for k, s in expected.items()):
        diff = sorted(set(expected.items()) ^ set(found.items()))[:4]
        raise CorruptFileError(f"{path}: the weights do not fit the {what} its header describes (e.g. {diff})")
    with reading(path, what):
        module = build()
        module.load_state_dict(tensors, strict=strict)
    return module


def check_provenance(value, path) -> dict[str, str]:
    """A stored provenance record (what produced the vectors of an index or gallery): a flat string map."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CorruptFileError(f"{path}: invalid provenance record {value!r}")
    return dict(value)
