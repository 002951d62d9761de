"""Save and load fitted classical learners: one safetensors file, never pickle.

The file holds ``components_`` (and any array hyper-parameter such as an ``init`` matrix) as
tensors, and the class name, hyper-parameters and scalar fitted attributes as JSON in the
checksummed header (see :mod:`metrix.io`): loading a damaged file fails with ``CorruptFileError``.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from metrix.io import CorruptFileError, load_tagged, reading, save_tagged

#: fitted attributes besides components_ that survive a save/load round trip
_FITTED_SCALARS = ("n_features_in_", "threshold_", "bounds_", "n_iter_", "fit_time_", "objective_history_")


def _json_value(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def save_estimator(estimator, path, extra: dict | None = None):
    """Save a fitted learner of :mod:`metrix.classical` to ``path`` (safetensors, atomic, checksummed).

    ``extra`` is a JSON-serialisable dict stored alongside (e.g. how the model was trained).
    """
    from metrix.classical import ESTIMATORS

    name = type(estimator).__name__
    if ESTIMATORS.get(name) is not type(estimator):
        raise TypeError(f"save_estimator saves metrix.classical learners, got {name}")
    check_is_fitted(estimator)
    tensors = {"components": torch.from_numpy(np.ascontiguousarray(estimator.components_))}
    params = {}
    for key, value in estimator.get_params(deep=False).items():
        if isinstance(value, np.ndarray):
            tensors[f"param.{key}"] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64))
        else:
            params[key] = _json_value(value)
    fitted = {k: _json_value(getattr(estimator, k)) for k in _FITTED_SCALARS if hasattr(estimator, k)}
    header = {"class": name, "params": params, "fitted": fitted, "extra": extra or {}}
    try:
        return save_tagged(path, tensors, "metrix_classical", header)
    except TypeError as exc:
        raise TypeError(f"cannot save {name}: a hyper-parameter is not JSON-serialisable ({exc})") from exc


def load_estimator(path, return_extra: bool = False):
    """Load a learner saved by :func:`save_estimator` (ready to ``transform``)."""
    from metrix.classical import ESTIMATORS

    tensors, header = load_tagged(path, "metrix_classical", "classical estimator file")
    if "components" not in tensors:
        raise CorruptFileError(f"{path} is not a metrix classical estimator file (no components)")
    cls = ESTIMATORS.get(header.get("class"))
    if cls is None:
        raise CorruptFileError(f"{path}: unknown estimator class {header.get('class')!r}")
    components = tensors["components"]
    if components.ndim != 2 or not components.is_floating_point() or not bool(torch.isfinite(components).all()):
        raise CorruptFileError(f"{path}: the components must be a finite 2-D matrix, got {tuple(components.shape)}")
    with reading(path, "classical estimator file"):
        params = dict(header["params"])
        for key, tensor in tensors.items():
            if key.startswith("param."):
                params[key[len("param."):]] = tensor.numpy()
            elif key != "components":
                raise CorruptFileError(f"{path}: unexpected tensor {key!r}")
        if isinstance(params.get("bounds"), list):
            params["bounds"] = tuple(params["bounds"])
        estimator = cls(**params)
        estimator.components_ = components.numpy().astype(np.float64)
        fitted = header["fitted"]
        if set(fitted) - set(_FITTED_SCALARS):
            raise CorruptFileError(f"{path}: unexpected fitted attributes {sorted(set(fitted) - set(_FITTED_SCALARS))}")
        for key, value in fitted.items():
            setattr(estimator, key, tuple(value) if key == "bounds_" else value)
        if getattr(estimator, "n_features_in_", components.shape[1]) != components.shape[1]:
            raise CorruptFileError(f"{path}: n_features_in_ disagrees with the components' {components.shape[1]} columns")
    return (estimator, header["extra"]) if return_extra else estimator
