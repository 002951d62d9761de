"""Slow float64 references written straight from each paper's formula: explicit Python loops over
pairs / triplets / classes, one scalar at a time. Differentiable, so gradients can be compared too."""

import math

import torch


def dist(a, b, metric):
    if metric == "euclidean":
        return torch.sqrt(((a - b) ** 2).sum())
    if metric == "sqeuclidean":
        return ((a - b) ** 2).sum()
    if metric == "cosine_similarity":  # the similarity form some losses are written for
        return (a @ b) / (a.norm() * b.norm())
    if metric == "cosine":
        return 1 - (a @ b) / (a.norm() * b.norm())
    if metric == "dot":
        return a @ b
    if metric == "poincare":  # Nickel & Kiela 2017, curvature −1
        z = 2 * ((a - b) ** 2).sum() / ((1 - (a * a).sum()) * (1 - (b * b).sum()))
        return torch.acosh(1 + z) if float(z.detach()) > 0 else z * 0  # acosh's gradient is infinite at 1
    raise ValueError(metric)


def _pairs(labels, ref_labels, same):
    B, R = len(labels), len(ref_labels)
    for i in range(B):
        for j in range(R):
            if same and i == j:
                continue
            yield i, j, bool(labels[i] == ref_labels[j])


def _mean_nonzero(terms):
    nz = [t for t in terms if float(t.detach()) > 0]
    return torch.stack(nz).sum() / len(nz) if nz else torch.zeros((), dtype=torch.float64)


def _reduce(terms, reduction):
    if reduction == "mean_nonzero":
        return _mean_nonzero(terms)
    if not terms:
        return torch.zeros((), dtype=torch.float64)
    total = torch.stack(terms).sum()
    return total / len(terms) if reduction == "mean" else total


def contrastive(emb, labels, ref=None, ref_labels=None, pos_margin=0.0, neg_margin=1.0, metric="euclidean",
                squared=False, reduction="mean_nonzero", selected=None):
    """Hadsell et al.: hinge on each positive and negative pair (flipped for similarities), optionally squared
    and halved; each side reduced on its own. ``selected(i, j)`` keeps only mined pairs."""
    same = ref is None
    ref, ref_labels = (emb, labels) if same else (ref, ref_labels)
    pos, neg = [], []
    for i, j, is_pos in _pairs(labels, ref_labels, same):
        if selected is not None and not selected(i, j, is_pos):
            continue
        d = dist(emb[i], ref[j], metric)
        if metric in ("cosine_similarity", "dot"):
            h = torch.relu(pos_margin - d) if is_pos else torch.relu(d - neg_margin)
        else:
            h = torch.relu(d - pos_margin) if is_pos else torch.relu(neg_margin - d)
        (pos if is_pos else neg).append(0.5 * h**2 if squared else h)
    return _reduce(pos, reduction) + _reduce(neg, reduction)


def triplet(emb, labels, ref=None, ref_labels=None, margin=0.05, triplets="all", metric="euclidean", reduction="mean_nonzero",
            selected=None):
    same = ref is None
    ref, ref_labels = (emb, labels) if same else (ref, ref_labels)
    sign = -1.0 if metric in ("cosine_similarity", "dot") else 1.0  # similarities: d = −s
    keep_pair = selected or (lambda i, j, is_pos: True)
    terms = []
    for a in range(len(labels)):
        d = {j: sign * dist(emb[a], ref[j], metric) for j in range(len(ref_labels)) if not (same and j == a)}
        positives = [j for j in d if ref_labels[j] == labels[a] and keep_pair(a, j, True)]
        negatives = [j for j in d if ref_labels[j] != labels[a] and keep_pair(a, j, False)]
        if triplets == "batch_hard":
            if positives and negatives:
                p = max(positives, key=lambda j: float(d[j].detach()))
                n = min(negatives, key=lambda j: float(d[j].detach()))
                terms.append(torch.relu(d[p] - d[n] + margin))
            continue
        for p in positives:
            for n in negatives:
                gap = float((d[n] - d[p]).detach())  # "triplet margin" of pytorch-metric-learning's miner
                keep = {
                    "all": True,
                    "hard": gap <= 0,
                    "semihard": 0 < gap <= margin,
                    "easy": gap > margin,
                }[triplets]
                if keep:
                    terms.append(torch.relu(d[p] - d[n] + margin))
    return _reduce(terms, reduction)


def multi_similarity(emb, labels, ref=None, ref_labels=None, alpha=2.0, beta=50.0, base=0.5, mining=True, epsilon=0.1):
    same = ref is None
    ref, ref_labels = (emb, labels) if same else (ref, ref_labels)
    losses = []
    for i in range(len(labels)):
        S = {j: dist(emb[i], ref[j], "cosine_similarity") for j in range(len(ref_labels)) if not (same and j == i)}
        P = [j for j in S if ref_labels[j] == labels[i]]
        N = [j for j in S if ref_labels[j] != labels[i]]
        if mining:
            max_neg = max((float(S[j]) for j in N), default=-math.inf)
            min_pos = min((float(S[j]) for j in P), default=math.inf)
            P2 = [j for j in P if float(S[j]) - epsilon < max_neg]
            N2 = [j for j in N if float(S[j]) + epsilon > min_pos]
            P, N = P2, N2
        pos_sum = sum((torch.exp(-alpha * (S[j] - base)) for j in P), torch.zeros((), dtype=torch.float64))
        neg_sum = sum((torch.exp(beta * (S[j] - base)) for j in N), torch.zeros((), dtype=torch.float64))
        losses.append(torch.log(1 + pos_sum) / alpha + torch.log(1 + neg_sum) / beta)
    return torch.stack(losses).mean()


def supcon(emb, labels, ref=None, ref_labels=None, temperature=0.1):
    same = ref is None
    ref, ref_labels = (emb, labels) if same else (ref, ref_labels)
    per_anchor = []
    for i in range(len(labels)):
        A = [j for j in range(len(ref_labels)) if not (same and j == i)]
        P = [j for j in A if ref_labels[j] == labels[i]]
        if not P:
            continue
        s = {j: dist(emb[i], ref[j], "cosine_similarity") / temperature for j in A}
        denom = sum(torch.exp(s[j]) for j in A)
        per_anchor.append(-sum(torch.log(torch.exp(s[p]) / denom) for p in P) / len(P))
    return torch.stack(per_anchor).mean() if per_anchor else torch.zeros((), dtype=torch.float64)


def _unit(v):
    return v / v.norm()


def arcface(emb, labels, weight, margin=0.5, scale=64.0):
    losses = []
    for i in range(len(labels)):
        logits = []
        for c in range(weight.shape[0]):
            cos = _unit(emb[i]) @ _unit(weight[c])
            if c == int(labels[i]):
                theta = torch.acos(cos)
                cos = torch.cos(theta + margin) if float(theta) < math.pi - margin else cos - margin * math.sin(margin)
            logits.append(scale * cos)
        logits = torch.stack(logits)
        losses.append(-(logits[int(labels[i])] - torch.log(torch.exp(logits).sum())))
    return torch.stack(losses).mean()


def cosface(emb, labels, weight, margin=0.35, scale=64.0):
    losses = []
    for i in range(len(labels)):
        logits = torch.stack([
            scale * (_unit(emb[i]) @ _unit(weight[c]) - (margin if c == int(labels[i]) else 0.0))
            for c in range(weight.shape[0])
        ])
        losses.append(-(logits[int(labels[i])] - torch.log(torch.exp(logits).sum())))
    return torch.stack(losses).mean()


def proxy_anchor(emb, labels, proxies, margin=0.1, alpha=32.0):
    C = proxies.shape[0]
    pos_terms, neg_terms = [], []
    for c in range(C):
        s = [_unit(emb[i]) @ _unit(proxies[c]) for i in range(len(labels))]
        pos = [s[i] for i in range(len(labels)) if int(labels[i]) == c]
        neg = [s[i] for i in range(len(labels)) if int(labels[i]) != c]
        if pos:
            pos_terms.append(torch.log(1 + sum(torch.exp(-alpha * (v - margin)) for v in pos)))
        neg_terms.append(torch.log(1 + sum((torch.exp(alpha * (v + margin)) for v in neg), torch.zeros((), dtype=torch.float64))))
    return torch.stack(pos_terms).sum() / len(pos_terms) + torch.stack(neg_terms).sum() / C


def circle(emb, labels, ref=None, ref_labels=None, m=0.4, gamma=80.0, selected=None):
    same = ref is None
    ref, ref_labels = (emb, labels) if same else (ref, ref_labels)
    keep_pair = selected or (lambda i, j, is_pos: True)
    losses = []
    for i in range(len(labels)):
        terms_p, terms_n = [], []
        for j in range(len(ref_labels)):
            if same and i == j or not keep_pair(i, j, bool(ref_labels[j] == labels[i])):
                continue
            s = dist(emb[i], ref[j], "cosine_similarity")
            if ref_labels[j] == labels[i]:
                alpha = max(0.0, 1 + m - float(s))  # a constant weight, as in the paper
                terms_p.append(torch.exp(-gamma * alpha * (s - (1 - m))))
            else:
                alpha = max(0.0, float(s) + m)
                terms_n.append(torch.exp(gamma * alpha * (s - m)))
        if terms_p and terms_n:
            losses.append(torch.log(1 + sum(terms_n) * sum(terms_p)))  # softplus(log a + log b)
    return torch.stack(losses).mean() if losses else torch.zeros((), dtype=torch.float64)


def generalized_lifted(emb, labels, ref=None, ref_labels=None, pos_margin=0.0, neg_margin=1.0, selected=None,
                       metric="euclidean"):
    same = ref is None
    ref, ref_labels = (emb, labels) if same else (ref, ref_labels)
    keep_pair = selected or (lambda i, j, is_pos: True)
    losses = []
    for i in range(len(labels)):
        pos = [torch.exp(dist(emb[i], ref[j], metric) - pos_margin) for j in range(len(ref_labels))
               if not (same and i == j) and ref_labels[j] == labels[i] and keep_pair(i, j, True)]
        neg = [torch.exp(neg_margin - dist(emb[i], ref[j], metric)) for j in range(len(ref_labels))
               if ref_labels[j] != labels[i] and keep_pair(i, j, False)]
        total = torch.zeros((), dtype=torch.float64)
        if pos:
            total = total + torch.log(sum(pos))
        if neg:
            total = total + torch.log(sum(neg))
        losses.append(torch.relu(total))
    return torch.stack(losses).mean()


def proxy_nca(emb, labels, proxies, scale=1.0):
    losses = []
    for i in range(len(labels)):
        logits = torch.stack([-scale * ((_unit(emb[i]) - _unit(proxies[c])) ** 2).sum() for c in range(proxies.shape[0])])
        losses.append(-(logits[int(labels[i])] - torch.log(torch.exp(logits).sum())))
    return torch.stack(losses).mean()


def normalized_softmax(emb, labels, weight, temperature=0.05):
    losses = []
    for i in range(len(labels)):
        logits = torch.stack([(_unit(emb[i]) @ _unit(weight[c])) / temperature for c in range(weight.shape[0])])
        losses.append(-(logits[int(labels[i])] - torch.log(torch.exp(logits).sum())))
    return torch.stack(losses).mean()


def lifted_structure(emb, labels, neg_margin=1.0, selected=None):
    n = len(labels)
    keep = selected or (lambda i, j, is_pos: True)
    terms = []
    for i in range(n):
        for j in range(n):
            if i == j or labels[i] != labels[j] or not keep(i, j, True):
                continue
            s = sum((torch.exp(neg_margin - dist(emb[a], emb[k], "euclidean"))
                     for a in (i, j) for k in range(n) if labels[k] != labels[a] and keep(a, k, False)),
                    torch.zeros((), dtype=torch.float64))
            if float(s.detach()) == 0:
                terms.append(torch.zeros((), dtype=torch.float64))
                continue
            jij = torch.log(s) + dist(emb[i], emb[j], "euclidean")
            terms.append(torch.relu(jij) ** 2 / 2)
    return torch.stack(terms).mean() if terms else torch.zeros((), dtype=torch.float64)


def npair(emb, labels, l2_reg=0.0):
    seen, pairs = {}, []
    for idx, lab in enumerate(labels.tolist()):
        seen.setdefault(lab, []).append(idx)
    for lab in sorted(seen, key=lambda k: seen[k][0]):
        if len(seen[lab]) >= 2:
            pairs.append((seen[lab][0], seen[lab][1]))
    losses = []
    for a, _ in pairs:
        logits = torch.stack([emb[a] @ emb[p2] for _, p2 in pairs])
        target = [x for x, _ in pairs].index(a)
        losses.append(-(logits[target] - torch.log(torch.exp(logits).sum())))
    loss = torch.stack(losses).mean()
    vecs = [emb[i] for pair in pairs for i in pair]
    return loss + l2_reg * torch.stack([v @ v for v in vecs]).mean()


def info_nce(q, p, negs, temperature):
    losses = []
    for i in range(q.shape[0]):
        pos = _unit(q[i]) @ _unit(p[i]) / temperature
        rows = negs[i] if negs.ndim == 3 else negs
        others = [_unit(q[i]) @ _unit(n) / temperature for n in rows]
        losses.append(-(pos - torch.log(torch.exp(pos) + sum(torch.exp(o) for o in others))))
    return torch.stack(losses).mean()


def center(emb, labels, centers):
    return torch.stack([0.5 * ((emb[i] - centers[int(labels[i])]) ** 2).sum() for i in range(len(labels))]).mean()


def nca(emb, labels, ref=None, ref_labels=None, softmax_scale=1.0):
    same = ref is None
    ref, ref_labels = (emb, labels) if same else (ref, ref_labels)
    losses = []
    for i in range(len(labels)):
        cols = [j for j in range(len(ref_labels)) if not (same and j == i)]
        w = {j: torch.exp(-softmax_scale * ((_unit(emb[i]) - _unit(ref[j])) ** 2).sum()) for j in cols}
        pos = [j for j in cols if ref_labels[j] == labels[i]]
        if pos:
            losses.append(-torch.log(sum(w[j] for j in pos) / sum(w.values())))
    return torch.stack(losses).mean() if losses else torch.zeros((), dtype=torch.float64)


def subcenter_arcface(emb, labels, weight, sub_centers=3, margin=0.5, scale=64.0):
    losses = []
    n_cls = weight.shape[0] // sub_centers
    for i in range(len(labels)):
        logits = []
        for c in range(n_cls):
            cos = max((_unit(emb[i]) @ _unit(weight[c * sub_centers + k]) for k in range(sub_centers)), key=float)
            if c == int(labels[i]):
                theta = torch.acos(cos)
                cos = torch.cos(theta + margin) if float(theta) < math.pi - margin else cos - margin * math.sin(margin)
            logits.append(scale * cos)
        logits = torch.stack(logits)
        losses.append(-(logits[int(labels[i])] - torch.log(torch.exp(logits).sum())))
    return torch.stack(losses).mean()


def softtriple(emb, labels, centers, k=10, la=20.0, gamma=0.1, margin=0.01):
    losses = []
    n_cls = centers.shape[0] // k
    for i in range(len(labels)):
        logits = []
        for c in range(n_cls):
            sims = torch.stack([_unit(emb[i]) @ _unit(centers[c * k + j]) for j in range(k)])
            s = (torch.softmax(sims / gamma, dim=0) * sims).sum()
            logits.append(la * (s - (margin if c == int(labels[i]) else 0.0)))
        logits = torch.stack(logits)
        losses.append(-(logits[int(labels[i])] - torch.log(torch.exp(logits).sum())))
    return torch.stack(losses).mean()


def large_margin_softmax(emb, labels, weight, m=4, scale=1.0, unit_weights=False):
    losses = []
    for i in range(len(labels)):
        logits = []
        for c in range(weight.shape[0]):
            cos = _unit(emb[i]) @ _unit(weight[c])
            norm = emb[i].norm() * (1.0 if unit_weights else weight[c].norm())
            if c == int(labels[i]):
                theta = torch.acos(cos)
                k = math.floor(float(theta) * m / math.pi)
                cos = (-1) ** k * torch.cos(m * theta) - 2 * k
            logits.append(scale * norm * cos)
        logits = torch.stack(logits)
        losses.append(-(logits[int(labels[i])] - torch.log(torch.exp(logits).sum())))
    return torch.stack(losses).mean()


def margin(emb, labels, beta, alpha=0.2, per_class=False):
    total, count = torch.zeros((), dtype=torch.float64), 0
    n = len(labels)
    for a in range(n):
        b = beta[int(labels[a])] if per_class else beta[0]
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            for k in range(n):
                if labels[k] == labels[a]:
                    continue
                pl = torch.relu(dist(emb[a], emb[p], "euclidean") - b + alpha)
                nl = torch.relu(b - dist(emb[a], emb[k], "euclidean") + alpha)
                total = total + pl + nl
                count += int(float(pl) > 0) + int(float(nl) > 0)
    return total / count


def angular(emb, labels, ref=None, ref_labels=None, alpha_degrees=40.0):
    same = ref is None
    ref, ref_labels = (emb, labels) if same else (ref, ref_labels)
    t2 = math.tan(math.radians(alpha_degrees)) ** 2
    terms = []
    for a in range(len(labels)):
        xa = _unit(emb[a])
        for p in range(len(ref_labels)):
            if (same and p == a) or ref_labels[p] != labels[a]:
                continue
            xp = _unit(ref[p])
            negs = [_unit(ref[n]) for n in range(len(ref_labels)) if ref_labels[n] != labels[a]]
            inner = sum((torch.exp(4 * t2 * (xa + xp) @ xn - 2 * (1 + t2) * xa @ xp) for xn in negs), torch.zeros((), dtype=torch.float64))
            terms.append(torch.log(1 + inner))
    return torch.stack(terms).mean()


def smooth_ap(emb, labels, ref=None, ref_labels=None, temperature=0.01):
    same = ref is None
    ref, ref_labels = (emb, labels) if same else (ref, ref_labels)
    aps = []
    for a in range(len(labels)):
        omega = [j for j in range(len(ref_labels)) if not (same and j == a)]
        P = [j for j in omega if ref_labels[j] == labels[a]]
        if not P:
            continue
        s = {j: _unit(emb[a]) @ _unit(ref[j]) for j in omega}
        ap = 0.0
        for i in P:
            r_all = 1 + sum(torch.sigmoid((s[j] - s[i]) / temperature) for j in omega if j != i)
            r_pos = 1 + sum((torch.sigmoid((s[j] - s[i]) / temperature) for j in P if j != i), torch.zeros((), dtype=torch.float64))
            ap = ap + r_pos / r_all
        aps.append(1 - ap / len(P))
    return torch.stack(aps).mean()
