"""A trained run, opened once and shared: model, settings, geometry and the inputs it accepts.

``Run.open(path)`` reads a run folder written by ``metrix train`` (or a folder that holds exactly one run)
once: the weights and config are verified, the model is put in inference mode for good, and the metric its
embeddings are compared with is read from the run's geometry. :meth:`Run.embed` never switches the model's
mode and runs under ``torch.inference_mode``, so one ``Run`` can serve many threads at once (a service's
requests) with the same results as a single thread.

Example
-------
>>> run = Run.open("runs/digits-ntxent")                      # doctest: +SKIP
>>> run.embed(load_dataset("digits").X[:5]).shape             # doctest: +SKIP
torch.Size([5, 64])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metrix._validation import progress_bar
from metrix.datasets import Dataset, load_dataset, resize_array, resize_images
from metrix.io import CorruptFileError, reading
from metrix.models import EmbeddingModel, load_model, run_fingerprint

MODEL_FILE = "model.safetensors"
# a run's geometry -> the metric (of metrix.distances.METRICS) its embeddings are compared with
GEOMETRY_METRICS = {"sphere": "euclidean", "poincare": "poincare"}


def check_device(device) -> torch.device:
    """``device`` as a torch device that exists here, or ``ValueError`` saying what is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from exc
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(dev.type, False):
        raise ValueError(f"device {device!r} is not available on this machine; available: "
                         f"{', '.join(k for k, v in available.items() if v)}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def resolve_run_dir(path) -> Path:
    """``path`` if it is a run folder, else the one run folder inside it; clear errors otherwise."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path} (give a run folder written by 'metrix train')")
    runs = sorted(d for d in path.iterdir() if (d / MODEL_FILE).is_file())
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise FileNotFoundError(f"{path} holds no run (no {MODEL_FILE} in it or in a sub-folder); "
                                "train one with 'metrix train'")
    raise ValueError(f"{path} holds {len(runs)} runs ({', '.join(r.name for r in runs)}); give one of them")


def new_run_dir(out, default_name: str) -> Path:
    """The folder a training command writes, created now so that two runs never pick the same one: ``out``
    itself (it must be new or empty), or ``runs/<default_name>`` (numbered ``-2``, ``-3``, … if taken).
    Every training command's ``--out`` means this: the run folder."""
    if out is not None:
        run_dir = Path(out)
        if run_dir.is_file() or (run_dir.is_dir() and not _never_started(run_dir)):
            raise ValueError(f"--out {run_dir} is not an empty folder: give a new folder for the run "
                             f"(or continue an interrupted run with --resume {run_dir})")
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    parent = Path("runs")
    parent.mkdir(parents=True, exist_ok=True)
    candidate, n = parent / default_name, 2
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            candidate, n = parent / f"{default_name}-{n}", n + 1


def _never_started(folder: Path) -> bool:
    """An empty folder, or one that a run killed in its first moments left: a ``checkpoints/`` holding nothing
    but temporary files (its settings never landed), so the run can be started again into it."""
    entries = list(folder.iterdir())
    if not entries:
        return True
    if [e.name for e in entries] != ["checkpoints"] or not entries[0].is_dir():
        return False
    return all(f.name.startswith(".") and f.name.endswith(".tmp") for f in entries[0].iterdir())


def model_file(path, made_by: str) -> Path:
    """The model file of a run folder (``<path>/model.safetensors``), or ``path`` itself when it is a file;
    ``made_by`` names the command that writes such runs, for the error message."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no {MODEL_FILE}: give a run folder written by '{made_by}'")
        return path / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path} (give a run folder written by '{made_by}')")
    return path


@dataclass(frozen=True)
class InputSpec:
    """The inputs a run's model takes: one sample's shape (flat vectors of the same size are accepted and
    reshaped), float32, and whether the model standardises them itself."""

    shape: tuple[int, ...]
    standardized: bool

    def check(self, inputs) -> torch.Tensor:
        """``inputs`` as a float32 (n, *shape) tensor, or ``ValueError`` saying what does not fit."""
        if isinstance(inputs, np.ndarray):
            if inputs.dtype.kind not in "fiub":
                raise ValueError(f"inputs must be numeric, got dtype {inputs.dtype}")
            inputs = torch.from_numpy(np.ascontiguousarray(inputs))
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a NumPy array or a torch tensor, got {type(inputs).__name__}")
        x = inputs.to(torch.float32)
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError("inputs are empty: give at least one sample")
        if tuple(x.shape[1:]) != self.shape:
            if math.prod(x.shape[1:]) != math.prod(self.shape):
                raise ValueError(f"this run takes samples of shape {self.shape} (or {math.prod(self.shape)} flat "
                                 f"values); got samples of shape {tuple(x.shape[1:])}")
            x = x.reshape(x.shape[0], *self.shape)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("inputs contain NaN or infinity")
        return x


def _trained_image_size(run) -> tuple[int, int] | None:
    """The (H, W) a run was trained at with ``--image-size``, or None."""
    config = getattr(run, "config", None)
    size = (config.get("train") or {}).get("image_size") if isinstance(config, dict) else None
    return None if size is None else tuple(size)


def at_run_size(run, x: np.ndarray) -> np.ndarray:
    """Images (n, C, H, W) or (n, H, W) resized to the size a run was trained at with ``--image-size``, so that
    it evaluates, embeds, indexes and explains image data as it trained on them; anything else as it is (a run
    without an image size takes its inputs as they are: it reshapes flat rows of its size and refuses the rest)."""
    size = _trained_image_size(run)
    return x if size is None or np.ndim(x) not in (3, 4) else resize_array(x, size)


def load_at_run_size(run, spec: str, label_column: str = "label") -> Dataset:
    """The dataset ``spec`` with its images at the size ``run`` takes (:func:`at_run_size`)."""
    ds = load_dataset(spec, label_column)
    size = _trained_image_size(run)
    return ds if size is None or ds.X.ndim not in (3, 4) else resize_images(ds, size)


def _in_batches(x: torch.Tensor, batch_size: int, progress: str | None, embed) -> torch.Tensor:
    """``embed`` over ``x`` in batches of ``batch_size`` samples, concatenated; ``progress``: a bar's label."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bar = progress_bar(len(x), progress, "sample")
    parts = []
    for i in range(0, len(x), int(batch_size)):
        parts.append(embed(x[i : i + int(batch_size)]))
        bar.update(parts[-1].shape[0])
    bar.close()
    return torch.cat(parts)


class Run:
    """A trained run: ``model`` (inference mode, never switched), ``config``, ``metric``, ``input_spec`` and
    ``fingerprint`` (SHA-256 of its weights file, which indexes and galleries built from it record)."""

    kind = "deep"  # or "classical" (a linear map from metrix fit-linear) or "text" (a sentence encoder)

    def __init__(self, path: Path, model: EmbeddingModel, config: dict, fingerprint: str):
        self.path, self.model, self.config, self.fingerprint = Path(path), model, config, fingerprint
        self.model.eval()
        self.model.requires_grad_(False)
        geometry = config.get("train", {}).get("geometry", "sphere")
        if geometry not in GEOMETRY_METRICS:
            raise ValueError(f"{path}: unknown geometry {geometry!r}")
        self.geometry, self.metric = geometry, GEOMETRY_METRICS[geometry]
        self.input_spec = InputSpec(tuple(model.input_shape), model.preprocess is not None)

    @classmethod
    def open(cls, path, device: str | torch.device = "cpu") -> "Run":
        """Load a run folder (or the one run inside ``path``) once, verified, onto ``device``: a deep run of
        ``metrix train`` (or ``selfsup``), a linear one of ``metrix fit-linear`` or a text encoder of
        ``metrix text train``."""
        if Path(path).suffix.lower() == ".onnx" and Path(path).is_file():
            return OnnxRun.open_file(Path(path))
        folder = resolve_run_dir(path)
        if (folder / "metrix_text.json").is_file():
            return TextRun.open_folder(folder, device)
        if not (folder / "config.json").is_file():
            return ClassicalRun.open_folder(folder)
        model, config = load_model(folder)
        return cls(folder, model.to(check_device(device)), config, run_fingerprint(folder))

    @property
    def embedding_dim(self) -> int:
        return self.model.output_dim

    def embed(self, inputs, batch_size: int = 1024, progress: str | None = None) -> torch.Tensor:
        """Embeddings of ``inputs`` (float32, CPU), ``batch_size`` samples at a time; safe from many threads.
        ``progress``: a label for a progress bar (shown on a terminal)."""
        x = self.input_spec.check(inputs)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            return _in_batches(x, batch_size, progress, lambda part: self.model(part.to(device)).float().cpu())

    def require_sphere(self, purpose: str) -> "Run":
        """This run, if its embeddings live on the unit sphere; tools that compare with L2 or cosine (gallery,
        OOD) refuse a run trained on the Poincaré ball instead of comparing in the wrong geometry."""
        if self.metric == "poincare":
            raise ValueError(f"this run embeds into the Poincaré ball, which {purpose} does not support (it compares "
                             "with L2 or cosine); use metrix.neighbors.knn(..., metric='poincare') or "
                             "retrieval_metrics(..., metric='poincare') for exact search and evaluation")
        return self

    def check_built_here(self, provenance: dict, what: str, allow_other_run: bool = False) -> None:
        """Refuse vectors that another run embedded (an index or gallery records its run's fingerprint)."""
        recorded = provenance.get("run")
        if recorded is not None and not allow_other_run and recorded != self.fingerprint:
            raise ValueError(f"the {what} was built with another run (fingerprint {recorded[:12]}…) than {self.path}; "
                             "embeddings of different runs are not comparable: rebuild it with this run, or pass "
                             "--allow-other-run if both runs are known to embed alike")


class ClassicalRun(Run):
    """A run of ``metrix fit-linear``: the learned linear map ``x ↦ L x`` (standardisation folded in), so the
    Euclidean distance of its embeddings is the learned Mahalanobis distance."""

    kind = "classical"

    def __init__(self, path: Path, estimator, extra: dict, fingerprint: str):
        self.path, self.model, self.config, self.fingerprint = Path(path), None, {"classical": extra}, fingerprint
        self.estimator = estimator
        self.geometry, self.metric = "linear", "euclidean"
        self.input_spec = InputSpec((int(estimator.n_features_in_),), True)

    @classmethod
    def open_folder(cls, folder: Path) -> "ClassicalRun":
        from metrix.classical.persistence import load_estimator

        estimator, extra = load_estimator(folder / MODEL_FILE, return_extra=True)
        return cls(folder, estimator, extra, run_fingerprint(folder))

    @property
    def embedding_dim(self) -> int:
        return int(self.estimator.components_.shape[0])

    def embed(self, inputs, batch_size: int = 1024, progress: str | None = None) -> torch.Tensor:
        x = self.input_spec.check(inputs)
        return torch.from_numpy(self.estimator.transform(x.reshape(len(x), -1).double().numpy()).astype(np.float32))


class TextRun(Run):
    """A run of ``metrix text train``: a sentence encoder; it embeds texts (a list of strings)."""

    kind = "text"

    def __init__(self, path: Path, encoder, fingerprint: str):
        self.path, self.model, self.config, self.fingerprint = Path(path), None, {}, fingerprint
        self.encoder = encoder
        self.geometry, self.metric = "sphere", "euclidean"
        self.input_spec = None

    @classmethod
    def open_folder(cls, folder: Path, device="cpu") -> "TextRun":
        from metrix.apps.text import SentenceEncoder

        encoder = SentenceEncoder.load(folder).to(check_device(device)).eval()
        encoder.requires_grad_(False)
        return cls(folder, encoder, run_fingerprint(folder))

    @property
    def embedding_dim(self) -> int:
        return int(self.encoder.dim)

    def embed(self, inputs, batch_size: int = 64, progress: str | None = None) -> torch.Tensor:
        if isinstance(inputs, str) or not all(isinstance(t, str) for t in inputs):
            raise ValueError("this is a text run: it embeds texts (a list of strings), not arrays")
        if not inputs:
            raise ValueError("inputs are empty: give at least one text")
        return torch.from_numpy(self.encoder.encode(list(inputs), batch_size, progress=progress))


ONNX_METADATA_KEY = "metrix"  # the entry of an exported ONNX model's metadata that holds onnx_metadata(run)
ONNX_METADATA_FIELDS = ("input_shape", "embedding_dim", "metric", "geometry", "run_fingerprint")


def onnx_metadata(run: Run) -> dict:
    """What :class:`OnnxRun` needs to serve a model exported from ``run``: shapes, metric, the run it came from."""
    return {"input_shape": list(run.input_spec.shape), "embedding_dim": run.embedding_dim, "metric": run.metric,
            "geometry": run.geometry, "run_fingerprint": run.fingerprint}


class OnnxRun(Run):
    """A model written by ``metrix export --format onnx``, run by ONNX Runtime (extra onnx): what a service
    needs without PyTorch's model code. Its shapes, metric and the fingerprint of the run it was exported
    from come from the file's metadata (the export checked that its embeddings equal that run's to 1e-5, so
    indexes and galleries of that run accept it)."""

    kind = "onnx"

    def __init__(self, path: Path, session, meta: dict):
        self.path, self.model, self.config, self.session = Path(path), None, {"onnx": meta}, session
        self.fingerprint = str(meta["run_fingerprint"])
        self.geometry, self.metric = str(meta["geometry"]), str(meta["metric"])
        self.input_spec = InputSpec(tuple(int(s) for s in meta["input_shape"]), True)
        self._dim = int(meta["embedding_dim"])

    @classmethod
    def open_file(cls, path: Path) -> "OnnxRun":
        try:
            import onnxruntime
        except ImportError as exc:
            raise ImportError("serving an ONNX model needs onnxruntime: pip install 'metrix[onnx]'") from exc
        try:
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for damaged files
            raise CorruptFileError(f"cannot read {path} as an ONNX model: {' '.join(str(exc).split())[:300]}") from exc
        raw = session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path} was not written by 'metrix export --format onnx' (no metrix metadata in it); "
                             "export the run again")
        with reading(path, "ONNX model metadata"):
            meta = json.loads(raw)
            for key in ONNX_METADATA_FIELDS:
                if key not in meta:
                    raise CorruptFileError(f"{path}: the metrix metadata lacks {key!r}")
        return cls(path, session, meta)

    @property
    def embedding_dim(self) -> int:
        return self._dim

    def embed(self, inputs, batch_size: int = 1024, progress: str | None = None) -> torch.Tensor:
        x = self.input_spec.check(inputs)
        # InferenceSession.run is safe from many threads
        return _in_batches(x, batch_size, progress,
                           lambda part: torch.from_numpy(self.session.run(None, {"inputs": part.numpy()})[0]).float())


def as_run(run) -> Run:
    """``run`` itself, or the run opened from a path (library entry points take either)."""
    return run if isinstance(run, Run) else Run.open(run)
