"""Input checks shared by every public function.

Bad input must fail loudly with a message that names the offending argument and its shape;
a silent NaN three calls later is the failure mode we are designing against.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def check_embeddings(x: Any, name: str = "embeddings") -> torch.Tensor:
    """Return ``x`` as a 2-D floating tensor with only finite values, or raise ``ValueError``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero features, shape {tuple(x.shape)}")
    # one reduction first: a finite sum proves every value finite (NaN and inf propagate); only an
    # overflowing sum of huge finite values needs the element-wise check
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or inf values in {bad} row(s) of {x.shape[0]}")
    return x


HALF_TYPES = (torch.float16, torch.bfloat16)


def check_loss_input(x: Any, name: str = "embeddings") -> torch.Tensor:
    """:func:`check_embeddings` for a loss: half-precision inputs are computed in float32 (squared norms of
    float16 values above ~256 overflow its range of 65504; the gradient still flows back as float16)."""
    x = check_embeddings(x, name)
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: a loss needs at least one sample")
    return x.float() if x.dtype in HALF_TYPES else x


def check_pair(x: torch.Tensor, y: torch.Tensor, x_name: str, y_name: str) -> None:
    """Check that two embedding matrices can be compared: same width and dtype."""
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{x_name} and {y_name} have different dimensions: "
            f"{x_name} has shape {tuple(x.shape)}, {y_name} has shape {tuple(y.shape)}"
        )
    if x.dtype != y.dtype:
        raise TypeError(f"{x_name} has dtype {x.dtype} but {y_name} has dtype {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{x_name} is on {x.device} but {y_name} is on {y.device}")


def check_labels(labels: Any, n: int, name: str = "labels", device=None) -> torch.Tensor:
    """Return integer labels as an int64 tensor of length ``n``.

    Any integer dtype is accepted (int8 ... int64, uint8); only equality between labels
    is used by pair/triplet losses, so their values may be arbitrary.
    """
    if isinstance(labels, np.ndarray):
        if labels.dtype.kind not in "iu":
            raise TypeError(
                f"{name} must be integers, got numpy dtype {labels.dtype}; "
                "encode string labels first, e.g. with metrix.datasets.encode_labels"
            )
        if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name} has uint64 values that do not fit in int64")
        labels = torch.from_numpy(labels.astype(np.int64, copy=False))
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but the embeddings have {n} rows")
    labels = labels.to(torch.int64)
    return labels if device is None else labels.to(device)


def check_positive(value: float, name: str, allow_zero: bool = False) -> float:
    value = float(value)
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def check_choice(value: str, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def label_codes(*label_arrays) -> tuple[list[np.ndarray], np.ndarray]:
    """The one label encoder: labels of any type (ints of any size, strings; NumPy, lists or CPU tensors) of
    one or more 1-D arrays mapped to int64 codes 0..C−1 shared by all of them; returns ``(codes per array,
    classes)``."""
    arrays = [np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a) for a in label_arrays]
    for a in arrays:
        if a.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {a.shape}")
    classes, codes = np.unique(np.concatenate(arrays) if len(arrays) > 1 else arrays[0], return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    bounds = np.cumsum([0] + [len(a) for a in arrays])
    return [codes[bounds[i] : bounds[i + 1]] for i in range(len(arrays))], classes


def progress_bar(total: int, label: str | None, unit: str = "item"):
    """A tqdm bar with a total for a phase that may take seconds, labelled ``label``; shown only when ``label``
    is given and stderr is a terminal (so logs, pipes and tests stay clean). Close it or let it be collected."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit=unit, leave=False, dynamic_ncols=True,
                disable=None if label else True)
