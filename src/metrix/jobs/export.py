"""What ``metrix export`` does: a trained deep run as a self-contained TorchScript or ONNX model."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from metrix.io import atomic_write_bytes
from metrix.runs import ONNX_METADATA_KEY, Run, as_run, onnx_metadata

FORMATS = ("torchscript", "onnx")


def export(run: Run | str | Path, out, fmt: str = "torchscript") -> dict:
    """Write ``run``'s model to ``out`` as TorchScript or ONNX (any batch size): raw inputs in, embeddings
    out, with the run's input standardisation and its final normalisation (unit sphere or Poincaré ball) inside,
    so a consumer needs no metrix. The exported model's output (for ONNX: ONNX Runtime's) is checked against the
    run's on a batch of zeros and random inputs before the file is written."""
    run = as_run(run)
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if run.kind != "deep":
        raise ValueError(f"only deep runs (metrix train) export; this is a {run.kind} run")
    model = run.model.cpu().eval()
    g = torch.Generator().manual_seed(0)
    example = torch.randn(4, *run.input_spec.shape, generator=g)
    probe = torch.cat([torch.zeros(1, *run.input_spec.shape), torch.randn(7, *run.input_spec.shape, generator=g)])
    with torch.no_grad(), warnings.catch_warnings():
        # the input-shape check in forward is a constant for the traced model (its inputs are fixed-shape)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if fmt == "onnx":  # what Run.open needs to serve the file: shapes, metric, the run it came from
            data, exported = _onnx(model, example, probe, onnx_metadata(run))
        else:
            data, exported = _torchscript(model, example, probe)
        gap = float(np.abs(exported - model(probe).numpy()).max())
    if not gap <= 1e-5:
        raise ValueError(f"the exported model differs from the run by {gap:.2e}; this architecture does not export")
    path = atomic_write_bytes(out, data)
    return {"out": Path(path), "format": fmt, "input_shape": list(run.input_spec.shape),
            "embedding_dim": run.embedding_dim, "metric": run.metric, "max_difference": gap}


def _torchscript(model, example, probe) -> tuple[bytes, np.ndarray]:
    traced = torch.jit.trace(model, example, check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    return buf.getvalue(), traced(probe).numpy()


def _onnx(model, example, probe, meta: dict) -> tuple[bytes, np.ndarray]:
    """ONNX (opset of the TorchScript-based exporter, batch size free) with ``meta`` as JSON in the model's
    metadata (:class:`metrix.runs.OnnxRun` reads it), run back through ONNX Runtime."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ImportError("ONNX export needs onnx and onnxruntime: pip install 'metrix[onnx]'") from exc
    buf = io.BytesIO()
    torch.onnx.export(model, (example,), buf, input_names=["inputs"], output_names=["embeddings"],
                      dynamic_axes={"inputs": {0: "batch"}, "embeddings": {0: "batch"}}, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(meta)
    data = proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return data, session.run(None, {"inputs": probe.numpy()})[0]
