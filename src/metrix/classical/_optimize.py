"""Numerical pieces shared by the iterative learners: L-BFGS over ``L`` and dense distance algebra.

The n × n objectives are written in terms of the squared distances ``D_ij = ||L x_i - L x_j||²``
and a weight matrix ``W = ∂f/∂D``; the gradient with respect to ``L`` is then a few matrix
products, ``∂f/∂L = 2 Eᵀ (diag(W1 + Wᵀ1) − W − Wᵀ) X`` with ``E = X Lᵀ`` (:func:`scatter_gradient`;
NCA and LMNN use the same identity, specialised to their sparse or row-stochastic ``W``), so no
per-pair or per-triplet outer products are ever formed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.optimize import minimize


def squared_distances(E: torch.Tensor) -> torch.Tensor:
    """Dense squared Euclidean distances between the rows of ``E`` (diagonal exactly 0)."""
    sq = (E * E).sum(1)
    D = sq[:, None] + sq[None, :] - 2.0 * (E @ E.T)
    D.clamp_(min=0.0)
    D.fill_diagonal_(0.0)
    return D


def scatter_gradient(E: torch.Tensor, X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``∂/∂L Σ_ij W_ij ||L(x_i − x_j)||²`` for ``E = X Lᵀ``: ``2 Eᵀ (diag(W1 + Wᵀ1) − W − Wᵀ) X``."""
    degree = W.sum(1) + W.sum(0)
    EW = E.T @ (W + W.T)  # m × n first: m ≤ d keeps this the cheaper order
    return 2.0 * ((E * degree[:, None]).T @ X - EW @ X)


class LBFGSResult:
    def __init__(self, L: np.ndarray, n_iter: int, history: list[float], message: str):
        self.L, self.n_iter, self.history, self.message = L, n_iter, history, message


def lbfgs(objective: Callable[[np.ndarray], tuple[float, np.ndarray]], L0: np.ndarray, *,
          max_iter: int, tol: float, log: Callable[[str], None] | None = None,
          bounds=None) -> LBFGSResult:
    """Minimise ``objective(L) -> (value, gradient)`` over the matrix ``L`` with L-BFGS-B.

    ``history`` holds the objective at the start and after every iteration (L-BFGS's line
    search accepts only decreasing steps, which the tests check).
    """
    shape = L0.shape
    history: list[float] = []

    def fun(flat):
        value, grad = objective(flat.reshape(shape))
        if not np.isfinite(value):
            # a step into a barrier (e.g. logdet → −∞): tell the line search to step back
            return np.inf, np.zeros_like(flat)
        return float(value), np.asarray(grad, dtype=np.float64).ravel()

    history.append(fun(L0.ravel())[0])

    def callback(intermediate_result):
        history.append(float(intermediate_result.fun))
        if log is not None:
            log(f"iteration {len(history) - 1:4d}  objective {history[-1]:.6g}")

    result = minimize(fun, L0.ravel(), jac=True, method="L-BFGS-B", tol=tol, bounds=bounds,
                      callback=callback, options={"maxiter": max_iter})
    return LBFGSResult(result.x.reshape(shape), int(result.nit), history, str(result.message))


def as_torch(X: np.ndarray) -> torch.Tensor:
    """A float64 tensor sharing ``X``'s memory where it can; read-only input (e.g. a memory map) is copied,
    as torch does not take non-writable arrays."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    return torch.from_numpy(X if X.flags.writeable else X.copy())
