"""metrix losses vs pytorch-metric-learning: same inputs, same process, forward + backward.

B=1024 embeddings of D=128 (64 classes × 16), float32, on this machine's CPU. For each loss it
prints the median time of both libraries (their calls alternate), the speed-up, the peak memory of torch allocations during one call, the
time against the GEMM floor (the flops of the B×R distance matrix, forward and backward, at the
measured matmul rate), and the absolute difference of the two loss values (they must agree).

    python benchmarks/losses_vs_pml.py            # all losses
    python benchmarks/losses_vs_pml.py --quick    # skip PML's slowest (NT-Xent) run
    python benchmarks/losses_vs_pml.py --only contrastive,circle   # a few losses

Requires the ``test`` extra (pytorch-metric-learning).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from metrix import losses as L

B, D, CLASSES = 1024, 128, 64


def peak_mb(fn) -> float:
    """Peak bytes held by torch allocations during ``fn()`` (forward and backward), in MB.

    The profiler records every allocation and free with a timestamp; the running sum's maximum is
    the peak. (RSS is useless here: the C allocator keeps freed pages, so it never shrinks.)
    """
    from torch.profiler import ProfilerActivity, profile

    L.release_scratch()  # metrix's reused B×R buffers are then allocated (and counted) inside this call
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for _, delta in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
        current += delta
        peak = max(peak, current)
    return peak / 2**20


def gemm_rate(n=2048) -> float:
    """Measured float32 matmul rate in flop/s (best of several)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def run_once(fn, emb):
    x = emb.clone().requires_grad_()
    t = time.perf_counter()
    value = fn(x)
    value.backward()
    return time.perf_counter() - t, float(value.detach())


def measure(ours, theirs, emb, reps, their_reps, blocks=False):
    """Median times of both libraries, taken in alternation (one call of each in turn) so that a slower or
    faster spell of this shared VM falls on both — or, with ``blocks``, all of one library's calls and then
    all of the other's; then each one's peak memory and loss value."""
    _, v_ours = run_once(ours, emb)  # warm-up
    v_theirs = None if theirs is None else run_once(theirs, emb)[1]
    if blocks:
        t_ours = [run_once(ours, emb)[0] for _ in range(reps)]
        t_theirs = [] if theirs is None else [run_once(theirs, emb)[0] for _ in range(their_reps)]
    else:
        t_ours, t_theirs = [], []
        for rep in range(reps):
            t_ours.append(run_once(ours, emb)[0])
            if theirs is not None and rep < their_reps:
                t_theirs.append(run_once(theirs, emb)[0])
    result = [(statistics.median(t_ours), peak_mb(lambda: run_once(ours, emb)), v_ours)]
    if theirs is None:
        return result + [(None, None, None)]
    return result + [(statistics.median(t_theirs), peak_mb(lambda: run_once(theirs, emb)), v_theirs)]


def active_share(emb, labels, margin: float) -> float:
    """The share of negative pairs closer than ``margin`` (Euclidean), i.e. with a non-zero contrastive term."""
    neg = labels[:, None] != labels[None, :]
    return float((torch.cdist(emb, emb)[neg] < margin).float().mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip pytorch-metric-learning's NT-Xent (about 40 s a call)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--blocks", action="store_true",
                        help="time each library's calls in one block instead of alternating them")
    parser.add_argument("--only", default="", help="run only the losses whose name contains one of these "
                        "comma-separated words, e.g. --only contrastive,circle")
    args = parser.parse_args()

    from pytorch_metric_learning import losses as P
    from pytorch_metric_learning import miners as PM

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(B, D), dim=1)
    labels = torch.arange(CLASSES).repeat_interleave(B // CLASSES)[torch.randperm(B)]
    views = torch.arange(B // 2).repeat(2)  # SimCLR: two views per sample, one positive each

    rate = gemm_rate()
    pair_floor = 6 * B * B * D / rate  # distance matrix: forward 2BRD, backward 4BRD
    proxy_floor = 6 * B * CLASSES * D / rate

    def proxies(ours_cls, pml_cls, **kw):
        ours = ours_cls(CLASSES, D, **kw["ours"])
        pml = pml_cls(num_classes=CLASSES, embedding_size=D, **kw["pml"])
        attr = kw["attr"]
        getattr(pml, attr).data = ours.weight.data.T.clone() if attr in ("W", "fc") else ours.weight.data.clone()
        return ours, pml

    arc = proxies(L.ArcFaceLoss, P.ArcFaceLoss, ours={"margin": 0.5, "scale": 64}, pml={"margin": 28.6479, "scale": 64}, attr="W")
    cos = proxies(L.CosFaceLoss, P.CosFaceLoss, ours={"margin": 0.35, "scale": 64}, pml={"margin": 0.35, "scale": 64}, attr="W")
    pa = proxies(L.ProxyAnchorLoss, P.ProxyAnchorLoss, ours={"margin": 0.1, "alpha": 32}, pml={"margin": 0.1, "alpha": 32}, attr="proxies")
    pnca = proxies(L.ProxyNCALoss, P.ProxyNCALoss, ours={}, pml={}, attr="proxies")
    nsm = proxies(L.NormalizedSoftmaxLoss, P.NormalizedSoftmaxLoss, ours={"temperature": 0.05}, pml={"temperature": 0.05}, attr="W")
    soft = proxies(L.SoftTripleLoss, P.SoftTripleLoss, ours={}, pml={}, attr="fc")
    sub = proxies(L.SubCenterArcFaceLoss, P.SubCenterArcFaceLoss, ours={}, pml={"margin": 28.6479}, attr="W")
    lsm = proxies(L.LargeMarginSoftmaxLoss, P.LargeMarginSoftmaxLoss, ours={"margin": 4}, pml={"margin": 4}, attr="W")
    margin_ours, margin_pml = L.MarginLoss(learn_beta=True), P.MarginLoss(learn_beta=True)

    semihard_miner = PM.TripletMarginMiner(margin=0.05, type_of_triplets="semihard")
    ms_miner = PM.MultiSimilarityMiner(epsilon=0.1)
    cases = [
        ("contrastive", pair_floor, lambda x: L.ContrastiveLoss()(x, labels), lambda x: P.ContrastiveLoss()(x, labels)),
        ("contrastive, m_neg=1.4 (41% active)", pair_floor, lambda x: L.ContrastiveLoss(neg_margin=1.4)(x, labels),
         lambda x: P.ContrastiveLoss(neg_margin=1.4)(x, labels)),
        ("triplet (all triplets)", pair_floor, lambda x: L.TripletMarginLoss(0.05)(x, labels),
         lambda x: P.TripletMarginLoss(margin=0.05)(x, labels)),
        ("triplet (semi-hard)", pair_floor, lambda x: L.TripletMarginLoss(0.05, "semihard")(x, labels),
         lambda x: P.TripletMarginLoss(margin=0.05)(x, labels, semihard_miner(x, labels))),
        ("triplet (batch-hard)", pair_floor, lambda x: L.TripletMarginLoss(0.05, "batch_hard")(x, labels),
         lambda x: P.TripletMarginLoss(margin=0.05)(x, labels, PM.BatchHardMiner()(x, labels))),
        ("multi-similarity + mining", pair_floor, lambda x: L.MultiSimilarityLoss()(x, labels),
         lambda x: P.MultiSimilarityLoss()(x, labels, ms_miner(x, labels))),
        ("NT-Xent, 2 views (SimCLR)", pair_floor, lambda x: L.NTXentLoss(0.07)(x, views),
         None if args.quick else (lambda x: P.NTXentLoss(temperature=0.07)(x, views))),
        ("NT-Xent, 16 positives vs PML SupCon", pair_floor, lambda x: L.NTXentLoss(0.07)(x, labels),
         lambda x: P.SupConLoss(temperature=0.07)(x, labels)),
        ("ArcFace", proxy_floor, lambda x: arc[0](x, labels), lambda x: arc[1](x, labels)),
        ("CosFace", proxy_floor, lambda x: cos[0](x, labels), lambda x: cos[1](x, labels)),
        ("Proxy-Anchor", proxy_floor, lambda x: pa[0](x, labels), lambda x: pa[1](x, labels)),
        ("circle", pair_floor, lambda x: L.CircleLoss()(x, labels), lambda x: P.CircleLoss()(x, labels)),
        ("generalized lifted structure", pair_floor, lambda x: L.GeneralizedLiftedStructureLoss()(x, labels),
         lambda x: P.GeneralizedLiftedStructureLoss()(x, labels)),
        ("ProxyNCA", proxy_floor, lambda x: pnca[0](x, labels), lambda x: pnca[1](x, labels)),
        ("normalized softmax", proxy_floor, lambda x: nsm[0](x, labels), lambda x: nsm[1](x, labels)),
        # PML's LiftedStructureLoss builds a (positive pairs × negative pairs) matrix: 15,360 × 983,040
        # floats (~60 GB) here, which the OOM killer stops; it is not run
        ("lifted structure (original)", pair_floor, lambda x: L.LiftedStructureLoss()(x, labels), None),
        ("N-pair", pair_floor, lambda x: L.NPairLoss(l2_reg=0.0)(x, labels), lambda x: P.NPairsLoss()(x, labels)),
        ("NCA", pair_floor, lambda x: L.NCALoss()(x, labels), lambda x: P.NCALoss()(x, labels)),
        ("margin (learnable beta)", pair_floor, lambda x: margin_ours(x, labels), lambda x: margin_pml(x, labels)),
        ("angular", pair_floor, lambda x: L.AngularLoss()(x, labels), lambda x: P.AngularLoss()(x, labels)),
        ("Smooth-AP (metrix only)", pair_floor, lambda x: L.SmoothAPLoss()(x, labels), None),
        ("SoftTriple", proxy_floor * 10, lambda x: soft[0](x, labels), lambda x: soft[1](x, labels)),
        ("sub-center ArcFace", proxy_floor * 3, lambda x: sub[0](x, labels), lambda x: sub[1](x, labels)),
        ("L-Softmax", proxy_floor, lambda x: lsm[0](x, labels), lambda x: lsm[1](x, labels)),
    ]

    print(f"# losses_vs_pml: B={B}, D={D}, {CLASSES} classes x {B // CLASSES}, float32, forward+backward")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"measured GEMM rate {rate / 1e9:.1f} GFLOP/s")
    print("# NT-Xent with 16 positives per anchor: PML's NTXentLoss needs ~63 GB here and is not run; "
          "its SupConLoss computes the same quantity and is the comparison")
    print("# lifted structure (original): PML's LiftedStructureLoss needs ~60 GB here (positive x negative pair "
          "matrix) and is not run; Smooth-AP: PML's SmoothAPLoss needs grouped equal-size classes and ranks the "
          "query in its own gallery, a different quantity")
    print("# contrastive: with the default margins no negative pair of these random unit vectors is active "
          "(d < 1 needs cos > 0.5), so metrix's backward is the positive list alone, with no B×R GEMM; "
          f"with m_neg = 1.4, {active_share(emb, labels, 1.4):.0%} of the negative pairs are active and the "
          "backward is a GEMM")
    header = f"| {'loss':<36} | {'metrix ms':>9} | {'PML ms':>9} | {'speed-up':>8} | {'metrix MB':>9} | {'PML MB':>8} | {'x GEMM floor':>12} | {'abs diff':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
    for name, floor, ours, theirs in cases:
        if wanted and not any(w in name.lower() for w in wanted):
            continue
        slow = name.startswith(("NT-Xent, 2", "triplet (all", "triplet (semi", "margin", "angular"))
        (t_ours, mb_ours, v_ours), (t_theirs, mb_theirs, v_theirs) = measure(
            ours, theirs, emb, args.reps, 1 if slow else args.reps, blocks=args.blocks)
        cells = [
            f"{name:<36}", f"{t_ours * 1e3:>9.1f}",
            f"{t_theirs * 1e3:>9.1f}" if t_theirs else f"{'skipped':>9}",
            f"{t_theirs / t_ours:>7.1f}x" if t_theirs else f"{'-':>8}",
            f"{mb_ours:>9.1f}", f"{mb_theirs:>8.1f}" if mb_theirs is not None else f"{'-':>8}",
            f"{t_ours / floor:>12.1f}",
            f"{abs(v_ours - v_theirs):>8.1e}" if v_theirs is not None else f"{'-':>8}",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
