"""Slow float64 references written straight from the papers, with explicit loops over pairs."""

import numpy as np


def sqdist(L, a, b):
    v = L @ (a - b)
    return float(v @ v)


def nca_loss(L, X, y):
    """Goldberger et al. 2004: −Σ_i Σ_{j: y_j = y_i} p_ij, p_ij = softmax_{j≠i}(−d_ij)."""
    n = len(X)
    total = 0.0
    for i in range(n):
        w = [np.exp(-sqdist(L, X[i], X[k])) if k != i else 0.0 for k in range(n)]
        z = sum(w)
        total += sum(w[j] for j in range(n) if y[j] == y[i] and j != i) / z
    return -total


def lmnn_loss(L, X, y, targets, mu):
    """Weinberger & Saul 2009, eq. (13): (1−μ) Σ pull + μ Σ [1 + d_ij − d_il]_+."""
    total = 0.0
    for i in range(len(X)):
        for j in targets[i]:
            if j < 0:
                continue
            d_ij = sqdist(L, X[i], X[j])
            total += (1 - mu) * d_ij
            for l in range(len(X)):
                if y[l] != y[i]:
                    total += mu * max(0.0, 1 + d_ij - sqdist(L, X[i], X[l]))
    return total


def mlkr_loss(L, X, y):
    """Weinberger & Tesauro 2007: Σ_i (y_i − Σ_{j≠i} k_ij y_j / Σ_{j≠i} k_ij)²."""
    total = 0.0
    for i in range(len(X)):
        k = np.array([np.exp(-sqdist(L, X[i], X[j])) if j != i else 0.0 for j in range(len(X))])
        total += (y[i] - k @ y / k.sum()) ** 2
    return total


def itml_loss(L, V, labels, A0, u, l, gamma):
    """Davis et al. 2007 with the slacks minimised out: D_ld(A, A0) + γ Σ D_ld(ξ_i, ξ0_i)."""
    A = L.T @ L
    d = A.shape[0]
    B = A @ np.linalg.inv(A0)
    value = np.trace(B) - np.linalg.slogdet(B)[1] - d
    for v, s in zip(V, labels):
        dist = float(v @ A @ v)
        if s == 1:
            xi0, xi = u, max(dist, u)  # the smallest divergence slack that satisfies d ≤ ξ
        else:
            xi0, xi = l, min(dist, l)  # d ≥ ξ
        value += gamma * (xi / xi0 - np.log(xi / xi0) - 1)
    return value


def itml_bregman(V, labels, A0, u, l, gamma, sweeps=3000):
    """The paper's Algorithm 1 (cyclic Bregman projections), one constraint at a time."""
    A = A0.copy()
    lam = np.zeros(len(V))
    xi = np.where(labels == 1, u, l).astype(float)
    for _ in range(sweeps):
        for i, (v, s) in enumerate(zip(V, labels)):
            p = float(v @ A @ v)
            if p == 0:
                continue
            delta = 1.0 if s == 1 else -1.0
            alpha = min(lam[i], delta / 2 * (1 / p - gamma / xi[i]))
            beta = delta * alpha / (1 - delta * alpha * p)
            xi[i] = gamma * xi[i] / (gamma + delta * alpha * xi[i])
            lam[i] -= alpha
            Av = A @ v
            A = A + beta * np.outer(Av, Av)
    return A


def mmc_ratio(L, V, labels):
    """Xing et al. 2002, scale-free: Σ_D d_M / sqrt(Σ_S d_M²) (to maximise)."""
    dis = sum(np.sqrt(sqdist(L, v, 0 * v)) for v, s in zip(V, labels) if s == -1)
    sim = sum(sqdist(L, v, 0 * v) for v, s in zip(V, labels) if s == 1)
    return dis / np.sqrt(sim)


def lfda_scatters(X, y, k):
    """Sugiyama 2007, eqs. (13)-(16): local within/between scatter with local-scaling affinity."""
    n = len(X)
    sigma = np.zeros(n)
    for i in range(n):
        same = [np.linalg.norm(X[i] - X[j]) for j in range(n) if y[j] == y[i] and j != i]
        sigma[i] = sorted(same)[min(k, len(same)) - 1]
    d = X.shape[1]
    S_w, S_b = np.zeros((d, d)), np.zeros((d, d))
    for i in range(n):
        for j in range(n):
            diff = np.outer(X[i] - X[j], X[i] - X[j])
            if y[i] == y[j]:
                a = np.exp(-np.linalg.norm(X[i] - X[j]) ** 2 / (sigma[i] * sigma[j]))
                n_c = np.sum(y == y[i])
                S_w += 0.5 * a / n_c * diff
                S_b += 0.5 * a * (1 / n - 1 / n_c) * diff
            else:
                S_b += 0.5 / n * diff
    return S_w, S_b
