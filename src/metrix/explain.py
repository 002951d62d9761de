"""Explain a similarity: which parts of two inputs make them close (or far) under a learned metric.

Two kinds of explanation, each with a stated guarantee:

- **Exact decompositions** for linear (Mahalanobis) metrics, ``d²(x, y) = ‖L(x − y)‖² = δᵀ M δ`` with
  ``δ = x − y`` and ``M = LᵀL``: per input feature ``c_i = δ_i (M δ)_i`` (they sum to ``d²`` exactly; a feature
  can push the pair apart or, through its correlations with others, together), and per learned direction
  ``(L_k · δ)²`` (non-negative, summing to ``d²``).
- **Integrated gradients** (Sundararajan et al., ICML 2017) for any differentiable run (deep image runs, MLPs,
  text encoders through the embedding layer): ``a_i = (x − x₀)_i ∫₀¹ ∂s(x₀ + α(x − x₀), y)/∂x_i dα`` for the
  similarity ``s`` of the pair with the other input held fixed, from a stated baseline ``x₀`` (a black image, the
  data mean, or zero token embeddings). Completeness — ``Σ a_i = s(x, y) − s(x₀, y)`` — holds up to the
  quadrature error, which every result reports (``completeness_error``); more ``steps`` shrink it.

The similarity explained is ``−d`` for the run's metric (larger = more alike), so positive attributions mark
what makes the two inputs alike.

Example
-------
>>> L = torch.eye(3, dtype=torch.float64)
>>> e = linear_contributions(L, torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 0, 0]))
>>> float(e.per_feature.sum()), float(e.squared_distance)
(13.0, 13.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metrix.distances import pairwise_distance


@dataclass(frozen=True)
class LinearExplanation:
    """``d²(x, y) = ‖L(x − y)‖²`` split per input feature (``per_feature``, summing to it) and per learned
    direction (``per_direction``, non-negative, summing to it)."""

    squared_distance: torch.Tensor
    per_feature: torch.Tensor
    per_direction: torch.Tensor


def linear_contributions(L, x, y) -> LinearExplanation:
    """The exact decomposition of the squared Mahalanobis distance of ``x`` and ``y`` (1-D, float64 inside)."""
    L, x, y = (torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a).double() for a in (L, x, y))
    if L.ndim != 2 or x.ndim != 1 or x.shape != y.shape or L.shape[1] != x.shape[0]:
        raise ValueError(f"need L (k, D) and two vectors of D values, got {tuple(L.shape)}, {tuple(x.shape)}, {tuple(y.shape)}")
    if not bool(torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("x and y must be finite")
    delta = x - y
    projected = L @ delta
    return LinearExplanation((projected * projected).sum(), delta * (L.T @ projected), projected * projected)


@dataclass(frozen=True)
class Attribution:
    """Integrated-gradients attributions of the pair's similarity ``−d`` to each input value of one side."""

    values: torch.Tensor  # shaped like the input
    similarity: float  # −d(x, y)
    baseline_similarity: float  # −d(x₀, y)
    completeness_error: float  # |Σ values − (similarity − baseline_similarity)|
    steps: int

    def to_dict(self) -> dict:
        return {"similarity": self.similarity, "baseline_similarity": self.baseline_similarity,
                "completeness_error": self.completeness_error, "steps": self.steps,
                "attributions": self.values.tolist()}


def _integrate(embed, x: torch.Tensor, x0: torch.Tensor, target: torch.Tensor, metric: str, steps: int,
               sum_last: bool = False) -> Attribution:
    """Integrated gradients of ``−d(embed(·), target)`` along the straight path from ``x0`` to ``x``
    (trapezoid rule over ``steps`` points, evaluated as one batch)."""
    if int(steps) < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    alphas = torch.linspace(0.0, 1.0, int(steps), dtype=x.dtype)
    path = (x0[None] + alphas.view(-1, *[1] * x.ndim) * (x - x0)[None]).requires_grad_()
    scores = -pairwise_distance(embed(path).double(), target.double(), metric)[:, 0]
    (grads,) = torch.autograd.grad(scores.sum(), path)
    weights = torch.full((int(steps),), 1.0 / (int(steps) - 1), dtype=torch.float64)
    weights[0] = weights[-1] = 0.5 / (int(steps) - 1)
    values = (x - x0).double() * (grads.double() * weights.view(-1, *[1] * x.ndim)).sum(0)
    if sum_last:
        values = values.sum(-1)
    s, s0 = float(scores[-1].detach()), float(scores[0].detach())
    return Attribution(values, s, s0, abs(float(values.sum()) - (s - s0)), int(steps))


def integrated_gradients(embed, x, other, metric: str = "euclidean", baseline=None, steps: int = 64) -> Attribution:
    """Attributions of ``−d(embed(x), embed(other))`` to the values of ``x``.

    Parameters
    ----------
    embed : a differentiable map from a batch of inputs (n, *shape) to embeddings (n, D) (a run's model)
    x, other : one input each, shaped as ``embed`` takes one sample (no batch dimension)
    metric : how embeddings are compared (a name of :data:`metrix.distances.METRICS`)
    baseline : the reference input ``x₀`` (default zeros: a black image)
    steps : points of the trapezoid rule over ``α ∈ [0, 1]``
    """
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float32)
    other = torch.as_tensor(np.asarray(other) if not torch.is_tensor(other) else other, dtype=torch.float32)
    x0 = torch.zeros_like(x) if baseline is None else torch.as_tensor(np.asarray(baseline), dtype=torch.float32).reshape(x.shape)
    if other.shape != x.shape:
        raise ValueError(f"the two inputs differ in shape: {tuple(x.shape)} and {tuple(other.shape)}")
    if not bool(torch.isfinite(x).all() and torch.isfinite(x0).all() and torch.isfinite(other).all()):
        raise ValueError("the inputs and the baseline must be finite")
    with torch.no_grad():
        target = embed(other[None])
    return _integrate(embed, x, x0, target, metric, steps)


def text_integrated_gradients(encoder, text: str, other: str, steps: int = 64) -> tuple[list[str], Attribution]:
    """Token attributions of ``−‖e(text) − e(other)‖`` for a :class:`~metrix.apps.text.SentenceEncoder`, by
    integrated gradients through the word-embedding layer from all-zero word embeddings (position and
    token-type embeddings stay as they are); returns the tokens and one attribution per token (summed over
    the embedding dimension)."""
    from metrix.apps.text import mean_pool

    if not all(isinstance(t, str) and t.strip() for t in (text, other)):
        raise ValueError("give two non-empty texts")
    encoder.eval()
    batch = encoder.tokenize([text])
    words = encoder.transformer.get_input_embeddings()(batch["input_ids"])[0].detach()
    mask = batch["attention_mask"]

    def embed(word_embeddings):  # (n, T, H) word embeddings → sentence embeddings, pooled as the encoder pools
        n = word_embeddings.shape[0]
        hidden = encoder.transformer(inputs_embeds=word_embeddings, attention_mask=mask.expand(n, -1)).last_hidden_state
        pooled = mean_pool(hidden, mask.expand(n, -1))
        return torch.nn.functional.normalize(pooled, dim=1) if encoder.normalize else pooled

    with torch.no_grad():
        target = encoder([other])
    attribution = _integrate(embed, words, torch.zeros_like(words), target, "euclidean", steps, sum_last=True)
    return encoder.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist()), attribution


def explain_pair(run, a, b, steps: int = 64, baseline=None) -> dict:
    """Why ``a`` and ``b`` are as close as they are under ``run`` (a :class:`metrix.runs.Run`): attributions
    for both sides, as JSON-able numbers.

    A classical (linear) run gets the exact decomposition of ``d²`` per input feature and per learned direction;
    a deep run gets integrated gradients of ``−d`` for each side with the other held fixed (``baseline``: the
    reference input, default zeros); a text run gets token attributions the same way.
    """
    if run.kind == "classical":
        L = torch.from_numpy(run.estimator.components_)
        xa = run.input_spec.check(np.asarray(a, dtype=np.float32)[None]).reshape(-1)
        xb = run.input_spec.check(np.asarray(b, dtype=np.float32)[None]).reshape(-1)
        e = linear_contributions(L, xa.double(), xb.double())
        d2 = float(e.squared_distance)
        return {"kind": "exact", "metric": "mahalanobis", "distance": d2 ** 0.5, "squared_distance": d2,
                "per_feature": e.per_feature.tolist(), "per_direction": e.per_direction.tolist(),
                "sum_error": abs(float(e.per_feature.sum()) - d2)}
    if run.kind == "text":
        tokens_a, att_a = text_integrated_gradients(run.encoder, a, b, steps)
        tokens_b, att_b = text_integrated_gradients(run.encoder, b, a, steps)
        return {"kind": "integrated_gradients", "metric": "euclidean", "distance": -att_a.similarity,
                "baseline": "zero word embeddings",
                "a": {"tokens": tokens_a, **att_a.to_dict()}, "b": {"tokens": tokens_b, **att_b.to_dict()}}
    xa = run.input_spec.check(np.asarray(a, dtype=np.float32)[None])[0]
    xb = run.input_spec.check(np.asarray(b, dtype=np.float32)[None])[0]
    att_a = integrated_gradients(run.model, xa, xb, run.metric, baseline, steps)
    att_b = integrated_gradients(run.model, xb, xa, run.metric, baseline, steps)
    result = {"kind": "integrated_gradients", "metric": run.metric, "distance": -att_a.similarity,
              "baseline": "zeros" if baseline is None else "given", "a": att_a.to_dict(), "b": att_b.to_dict()}
    if getattr(run.model, "backbone_name", None) == "convnet_gap" and isinstance(run.model.head, torch.nn.Linear):
        maps = gap_pairwise_maps(run.model, xa, xb)  # exact, over feature-map positions, besides the gradients
        result["exact_pairwise"] = {"cosine": maps.cosine, "map_a": maps.map_x.tolist(), "map_b": maps.map_y.tolist(),
                                    "pairs": maps.pairs.tolist()}
    return result


def attribution_maps(result: dict) -> tuple[np.ndarray, np.ndarray]:
    """The two sides' attribution arrays of :func:`explain_pair`: the exact pairwise maps when the run has them
    (feature-map resolution), else the gradients' (the exact linear decomposition is one per-feature array
    shared by both sides)."""
    if "exact_pairwise" in result:
        return np.asarray(result["exact_pairwise"]["map_a"]), np.asarray(result["exact_pairwise"]["map_b"])
    if result["kind"] == "exact":
        per_feature = np.asarray(result["per_feature"])
        return per_feature, per_feature
    return np.asarray(result["a"]["attributions"]), np.asarray(result["b"]["attributions"])


def plot_pairs(pairs: list[tuple[np.ndarray, np.ndarray, dict, str]], path) -> None:
    """One row per pair — input A, input B, A's map, B's map (red: makes them alike; blue: apart) — with
    each pair's distance; ``pairs`` holds ``(a, b, explain_pair result, title)``. Needs the plots extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the figure needs matplotlib: pip install 'metrix[plots]' (or use --json)") from exc
    from metrix.io import atomic_write_bytes

    fig, axes = plt.subplots(len(pairs), 4, figsize=(8, 2.1 * len(pairs)), squeeze=False)
    for row, (a, b, result, title) in zip(axes, pairs):
        map_a, map_b = attribution_maps(result)
        # the exact decomposition explains d² (larger = apart): flip it so red always means "alike"
        sign = -1.0 if result["kind"] == "exact" else 1.0
        for ax, image, label in ((row[0], a, "A"), (row[1], b, "B")):
            ax.imshow(_square(image), cmap="gray")
            ax.set_title(label, fontsize=8)
        for ax, values in ((row[2], map_a), (row[3], map_b)):
            v = sign * _square(values)
            bound = float(np.abs(v).max()) or 1.0
            ax.imshow(v, cmap="RdBu_r", vmin=-bound, vmax=bound)
        row[2].set_title(f"{title}: d = {result['distance']:.3f}", fontsize=8)
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _square(values) -> np.ndarray:
    """An input or a map as a 2-D picture: (C, H, W) summed over channels, (H, W) as is, flat squares folded."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 3:
        return v.sum(0)
    if v.ndim == 2:
        return v
    side = int(round(len(v) ** 0.5))
    return v.reshape(side, side) if side * side == len(v) else v[None, :]


@dataclass(frozen=True)
class PairwiseMaps:
    """The exact decomposition of ``cos(e(x), e(y))`` over pairs of feature-map positions (Stylianou et al.,
    2019) for a run whose embedding is a linear head over globally average-pooled conv features:
    ``cos = Σ_p Σ_q pairs[p, q]`` (+ nothing: the head's bias is shared out over the positions). ``map_x`` and
    ``map_y`` sum ``pairs`` over the other side; ``pairs[p]`` is the point-specific map of position p of x."""

    pairs: torch.Tensor  # (Hx·Wx, Hy·Wy)
    map_x: torch.Tensor  # (Hx, Wx)
    map_y: torch.Tensor  # (Hy, Wy)
    cosine: float


def gap_pairwise_maps(model, x: torch.Tensor, y: torch.Tensor) -> PairwiseMaps:
    """:class:`PairwiseMaps` of two inputs of an :class:`~metrix.models.EmbeddingModel` with the
    ``convnet_gap`` backbone and a linear head (``ValueError`` for any other architecture: then use
    :func:`integrated_gradients`).

    With ``F_p`` the feature vector at position p of P, the unnormalised embedding is
    ``z = W·(1/P Σ_p F_p) + b = Σ_p u_p`` with ``u_p = (W F_p + b)/P``, so
    ``cos = z(x)·z(y)/(‖z(x)‖‖z(y)‖) = Σ_p Σ_q u_p(x)·u_q(y)/(‖z(x)‖‖z(y)‖)``, exactly.
    """
    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if getattr(model, "backbone_name", None) != "convnet_gap" or not isinstance(head, torch.nn.Linear):
        raise ValueError("the exact pairwise decomposition needs the convnet_gap backbone with a linear head; "
                         "use integrated gradients for this run")
    if model.ball_curvature is not None:
        raise ValueError("the exact pairwise decomposition is for runs on the sphere, not the Poincaré ball")
    with torch.no_grad():
        def positions(inp):
            inp = torch.as_tensor(inp, dtype=torch.float32)[None]
            if model.preprocess is not None:
                inp = model.preprocess(inp)
            fmap = backbone[0](inp)[0].double()  # (C, H, W): the feature map before the pooling
            c, h, w = fmap.shape
            u = (fmap.reshape(c, h * w).T @ head.weight.double().T + head.bias.double()) / (h * w)  # (P, D)
            return u, (h, w)

        ux, shape_x = positions(x)
        uy, shape_y = positions(y)
        zx, zy = ux.sum(0), uy.sum(0)
        pairs = (ux @ uy.T) / (torch.linalg.vector_norm(zx) * torch.linalg.vector_norm(zy))
    return PairwiseMaps(pairs, pairs.sum(1).reshape(shape_x), pairs.sum(0).reshape(shape_y), float(pairs.sum()))
