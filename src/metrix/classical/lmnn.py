"""Large Margin Nearest Neighbor (Weinberger & Saul, JMLR 2009).

Pull each point's ``k`` target neighbours (nearest same-class points in the input space) close,
and push every differently labelled point ("impostor") at least a unit margin further away:

``ε(L) = (1 − μ) Σ_{i, j⇝i} D_ij + μ Σ_{i, j⇝i} Σ_{l: y_l ≠ y_i} [1 + D_ij − D_il]_+``,  ``D_ij = ||L(x_i − x_j)||²``.

Solved with L-BFGS over ``L`` (as in Weinberger's later code and pylmnn) instead of metric-learn's
sub-gradient descent; every evaluation works on dense row blocks of ``D`` with boolean masks.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from metrix.classical._base import MahalanobisLearner, encode_classes, initial_components
from metrix.classical._optimize import as_torch, squared_distances


def target_neighbors(X: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """Indices (n, k) of each point's k nearest same-class points; −1 where a class is too small."""
    n = len(codes)
    out = -np.ones((n, k), dtype=np.int64)
    Xt = as_torch(X)
    for c in np.unique(codes):
        idx = np.flatnonzero(codes == c)
        kc = min(k, len(idx) - 1)
        if kc < 1:
            continue
        D = squared_distances(Xt[idx])
        D.fill_diagonal_(float("inf"))
        nearest = torch.topk(D, kc, dim=1, largest=False).indices.numpy()
        out[idx, :kc] = idx[nearest]
    return out


def lmnn_objective(L: np.ndarray, X: np.ndarray, y: np.ndarray, targets: np.ndarray,
                   regularization: float = 0.5) -> tuple[float, np.ndarray]:
    """LMNN loss and its gradient with respect to ``L`` (``targets`` from :func:`target_neighbors`)."""
    codes = np.unique(y, return_inverse=True)[1].ravel()
    return _LMNNProblem(X, codes, targets, regularization)(L)


class _LMNNProblem:
    """LMNN loss and gradient with the impostors found on the dense distance matrix, then sparse.

    A differently labelled ``l`` can only violate a margin of ``i`` if ``D_il < max_j D_ij + 1``;
    one comparison over the n × n matrix finds these candidates, and all further work (hinges,
    weights, gradient) is on that sparse set: CSR products instead of k dense passes.
    """

    def __init__(self, X, codes, targets, regularization):
        order = np.argsort(codes, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        self.X = as_torch(X[order])
        targets = targets[order]
        valid = targets >= 0
        self.targets = torch.from_numpy(np.where(valid, rank[np.where(valid, targets, 0)], 0))
        self.valid = torch.from_numpy(valid).to(torch.float64)
        counts = np.bincount(codes[order])
        self.blocks = [(int(s), int(s + c)) for s, c in zip(np.cumsum(counts) - counts, counts) if c]
        self.mu = float(regularization)
        # the two n × n work buffers live as long as the problem: allocating them per evaluation
        # costs page faults that doubled the evaluation time
        n = len(order)
        self._partial = torch.empty(n, n, dtype=torch.float32)
        self._candidate = torch.empty(n, n, dtype=torch.bool)

    def __call__(self, L: np.ndarray):
        X, mu = self.X, self.mu
        n, k = self.targets.shape
        E = X @ as_torch(L).T
        sq = (E * E).sum(1)
        # exact target distances from n·k gathered differences
        dE = E[:, None, :] - E[self.targets]  # n × k × m
        Dt = (dE * dE).sum(2)
        reach = torch.where(self.valid > 0, Dt, -torch.inf).amax(1) + 1.0
        # D_il < reach_i  ⇔  ||e_l||² − 2 e_i·e_l < reach_i − ||e_i||²: one GEMM and one comparison.
        # The search runs in float32 with a margin far above its rounding error, so it returns a
        # superset of the impostors (extra candidates get a zero hinge); their distances are then
        # recomputed exactly in float64.
        ones = torch.ones(n, 1, dtype=E.dtype)
        left, right = torch.cat([E, ones], 1).float(), torch.cat([-2.0 * E, sq[:, None]], 1).float()
        partial = torch.mm(left, right.T, out=self._partial)  # [e_i, 1]·[−2e_l, ||e_l||²]
        margin = 1e-4 * (sq + sq.max() + 1.0)
        candidate = torch.lt(partial, (reach - sq + margin).float()[:, None], out=self._candidate)
        for a, b in self.blocks:  # same class is never an impostor
            candidate[a:b, a:b] = False
        rows, cols = candidate.nonzero(as_tuple=True)
        D_imp = (sq[rows] + sq[cols] - 2.0 * (E[rows] * E[cols]).sum(1)).clamp_(min=0.0)
        hinge = (1.0 + Dt[rows] - D_imp[:, None]).clamp_(min=0.0) * self.valid[rows]  # c × k
        active = (hinge > 0).to(E.dtype)
        push = hinge.sum()
        # weights ∂ε/∂D: targets get (1 − μ) + μ·#active impostors; impostors get −μ·#active targets
        target_w = (1.0 - mu) * self.valid
        target_w.index_add_(0, rows, mu * active)
        imp_w = -mu * active.sum(1)
        value = (1.0 - mu) * (Dt * self.valid).sum() + mu * push
        dX = X[:, None, :] - X[self.targets]
        grad = 2.0 * (dE * target_w[..., None]).reshape(n * k, -1).T @ dX.reshape(n * k, -1)
        # impostors: Laplacian form with CSR products, Σ w (e_i − e_l)(x_i − x_l)ᵀ
        if len(rows):
            crow = torch.zeros(n + 1, dtype=torch.int64)
            crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
            with warnings.catch_warnings():  # "sparse CSR is beta": the product used here is stable
                warnings.simplefilter("ignore", UserWarning)
                Wimp = torch.sparse_csr_tensor(crow, cols, imp_w, (n, n), check_invariants=False)
            degree = torch.zeros(n, dtype=E.dtype).index_add_(0, rows, imp_w).index_add_(0, cols, imp_w)
            grad += 2.0 * ((E * degree[:, None]).T @ X - E.T @ (Wimp @ X) - (Wimp @ E).T @ X)
        return float(value), grad.numpy()


class LMNN(MahalanobisLearner):
    """Large Margin Nearest Neighbor metric learning.

    Parameters
    ----------
    n_neighbors : int
        Target neighbours per point (default 3, as in the paper and metric-learn).
    regularization : float in [0, 1]
        Weight ``μ`` of the push (impostor) term; ``1 − μ`` weighs the pull term (default 0.5).
    n_components : int or None
    init : 'auto', 'pca', 'lda', 'identity', 'random' or array
    max_iter : int
        L-BFGS iterations (default 200).
    tol : float
        Stop when an iteration lowers the objective by less than this fraction (default 1e-4:
        on digits the objective is then within 1% of its converged value; metric-learn stops
        at a relative change of 1e-3).
    random_state : int or None
    verbose : int

    Attributes
    ----------
    components_, n_iter_, objective_history_

    Example
    -------
    >>> from sklearn.datasets import load_iris
    >>> X, y = load_iris(return_X_y=True)
    >>> LMNN(n_neighbors=3).fit(X, y).components_.shape
    (4, 4)
    """

    def __init__(self, n_neighbors=3, regularization=0.5, n_components=None, init="auto", max_iter=200,
                 tol=1e-4, random_state=None, verbose=0):
        self.n_neighbors = n_neighbors
        self.regularization = regularization
        self.n_components = n_components
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose

    def _learn(self, X, y):
        if not 0.0 <= self.regularization <= 1.0:
            raise ValueError(f"regularization must be in [0, 1], got {self.regularization}")
        if int(self.n_neighbors) < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {self.n_neighbors}")
        _, codes = encode_classes(y)
        targets = target_neighbors(X, codes, int(self.n_neighbors))
        if (targets < 0).all():
            raise ValueError("LMNN needs a class with at least two samples (every class has one)")
        n_components = self._n_components(X.shape[1])
        L0 = initial_components(self.init, X, codes, n_components, self.random_state)
        problem = _LMNNProblem(X, codes, targets, float(self.regularization))
        return self._minimize(problem, L0)
