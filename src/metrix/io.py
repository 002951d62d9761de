"""Safe persistence: safetensors for tensors, JSON for everything else, never pickle.

Every file is written atomically (a temporary file in the same folder, fsync, then ``os.replace``)
so a crash never leaves a half-written model behind, and carries a SHA-256 checksum so that a file
damaged after writing fails loudly on load instead of producing a silently wrong model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

FORMAT_VERSION = "1"
_CHECKSUM_KEY = "metrix_sha256"
_VERSION_KEY = "metrix_format"


class CorruptFileError(ValueError):
    """A saved file failed to parse or its checksum does not match its contents."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # view as bytes: works for every dtype, bfloat16 included
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save a flat dict of tensors as safetensors with a checksum in the header."""
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[_VERSION_KEY] = FORMAT_VERSION
    meta[_CHECKSUM_KEY] = _tensor_digest(clean)
    return atomic_write_bytes(path, _st_save(clean, metadata=meta))


def load_tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors saved by :func:`save_tensors`, verifying format version and checksum."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    raw = path.read_bytes()
    try:
        tensors = _st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise CorruptFileError(f"{path} is not a valid safetensors file: {exc}") from exc
    meta = header.get("__metadata__", {}) or {}
    version = meta.get(_VERSION_KEY)
    if version != FORMAT_VERSION:
        raise CorruptFileError(
            f"{path} has metrix format version {version!r}; this metrix reads version {FORMAT_VERSION!r}"
        )
    expected = meta.get(_CHECKSUM_KEY)
    if expected != _tensor_digest(tensors):
        raise CorruptFileError(f"{path}: checksum mismatch, the file is damaged or was modified")
    user_meta = {k: v for k, v in meta.items() if k not in (_CHECKSUM_KEY, _VERSION_KEY)}
    return tensors, user_meta


def save_tagged(path, tensors: dict[str, torch.Tensor], tag: str, info: dict) -> Path:
    """:func:`save_tensors` with a JSON ``info`` object under the header key ``tag`` (what the file is)."""
    return save_tensors(path, tensors, metadata={tag: json.dumps(info)})


def load_tagged(path, tag: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a file written by :func:`save_tagged`; a file without ``tag`` is not a ``what``."""
    tensors, meta = load_tensors(path)
    if tag not in meta:
        raise CorruptFileError(f"{path} is not a metrix {what}")
    try:
        info = json.loads(meta[tag])
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path}: unreadable {what} header: {exc}") from exc
    return tensors, info


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_json(path, obj: dict, checksum: bool = True) -> Path:
    """Save a JSON object atomically; with ``checksum`` a ``metrix_sha256`` field guards it."""
    if not isinstance(obj, dict):
        raise TypeError("save_json expects a dict")
    payload = dict(obj)
    if checksum:
        payload[_VERSION_KEY] = FORMAT_VERSION
        payload[_CHECKSUM_KEY] = _json_digest({k: v for k, v in payload.items() if k != _CHECKSUM_KEY})
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(path, text.encode())


def load_json(path, checksum: bool = True) -> dict:
    """Load JSON written by :func:`save_json`; with ``checksum`` verify version and checksum."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
        if version != FORMAT_VERSION:
            raise CorruptFileError(
                f"{path} has metrix format version {version!r}; this metrix reads {FORMAT_VERSION!r}"
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
            return tensors[tree["__tensor__"]]
        if "__dict__" in tree:
            return {k: unflatten_state(v, tensors) for k, v in tree["__dict__"]}
        if "__tuple__" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        raise CorruptFileError(f"unexpected node in saved state: {sorted(tree)}")
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree
