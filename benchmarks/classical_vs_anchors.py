"""metrix.classical against scikit-learn and metric-learn 0.7.0: 3-NN accuracy and fit time.

Protocol (issue 4): iris, wine and digits, standardised on the train split, stratified 70/30 split
(random_state=0); each learner is fitted on the train split, 3-NN accuracy of the test split in
its learned space. Fit time is the best of 3 fits when one fit takes under 2 s (else one fit),
for metrix and the anchors alike, after one warm-up fit on iris to load libraries.

metric-learn does not run on scikit-learn >= 1.8, so it runs in its own virtual environment
(``.venv-metric-learn`` beside this script, created on first use with ``scikit-learn<1.8`` and
``metric-learn==0.7.0``): this script re-runs itself there with ``--anchors-only`` and reads the
JSON it prints. ::

    python benchmarks/classical_vs_anchors.py            # everything, prints a markdown table
    python benchmarks/classical_vs_anchors.py --only LMNN,ITML
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits, load_iris, load_wine
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

DATASETS = {"iris": load_iris, "wine": load_wine, "digits": load_digits}
ALGORITHMS = ["Covariance", "NCA", "LMNN", "ITML", "MMC", "MMC-diagonal", "LFDA", "FDA", "FDA-ratio", "RCA", "MLKR"]
HERE = Path(__file__).resolve().parent
ANCHOR_VENV = HERE / ".venv-metric-learn"


def split(name):
    X, y = DATASETS[name](return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    scaler = StandardScaler().fit(X_tr)
    return scaler.transform(X_tr), scaler.transform(X_te), y_tr, y_te


def measure(make, X_tr, X_te, y_tr, y_te):
    """Best-of-3 fit time (one fit if it takes >= 2 s) and 3-NN test accuracy; errors are reported."""
    try:
        times = []
        for _ in range(3):
            est = make()
            start = time.perf_counter()
            est.fit(X_tr, y_tr)
            times.append(time.perf_counter() - start)
            if times[-1] >= 2.0:
                break
        Z_tr, Z_te = est.transform(X_tr), est.transform(X_te)
        if not (np.isfinite(Z_tr).all() and np.isfinite(Z_te).all()):
            return {"error": "non-finite transform"}
        acc = KNeighborsClassifier(3).fit(Z_tr, y_tr).score(Z_te, y_te)
        return {"accuracy": float(acc), "seconds": float(min(times))}
    except Exception as exc:  # an anchor that crashes is a result, not a benchmark failure
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}


def metric_learn_makers():
    import metric_learn as ml

    return {
        "Covariance": lambda: ml.Covariance(),
        "NCA": lambda: ml.NCA(random_state=0),
        "LMNN": lambda: ml.LMNN(n_neighbors=3, random_state=0),
        "ITML": lambda: ml.ITML_Supervised(random_state=0),
        "MMC": lambda: ml.MMC_Supervised(random_state=0),
        "MMC-diagonal": lambda: ml.MMC_Supervised(diagonal=True, random_state=0),
        "LFDA": lambda: ml.LFDA(),
        "RCA": lambda: ml.RCA_Supervised(random_state=0),
        "MLKR": lambda: ml.MLKR(random_state=0),
    }


def metrix_makers():
    import metrix.classical as mc
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.neighbors import NeighborhoodComponentsAnalysis

    ours = {
        "Covariance": lambda: mc.Covariance(),
        "NCA": lambda: mc.NCA(random_state=0),
        "LMNN": lambda: mc.LMNN(n_neighbors=3, random_state=0),
        "ITML": lambda: mc.ITML(random_state=0),
        "MMC": lambda: mc.MMC(random_state=0),
        "MMC-diagonal": lambda: mc.MMC(diagonal=True, random_state=0),
        "LFDA": lambda: mc.LFDA(),
        "FDA": lambda: mc.FDA(),
        "FDA-ratio": lambda: mc.FDA(objective="ratio"),
        "RCA": lambda: mc.RCA(),
        "MLKR": lambda: mc.MLKR(random_state=0),
    }
    sklearn_anchors = {
        "NCA": lambda: NeighborhoodComponentsAnalysis(random_state=0),
        "FDA": lambda: LinearDiscriminantAnalysis(),  # Fisher's own criterion: the natural anchor
        "FDA-ratio": lambda: LinearDiscriminantAnalysis(),
    }
    return ours, sklearn_anchors


def run(makers, algorithms, label):
    warm = split("iris")
    for name in algorithms:  # load every code path once before timing anything
        if name in makers:
            measure(makers[name], *warm)
    results = {}
    for dataset in DATASETS:
        data = split(dataset)
        for name in algorithms:
            if name in makers:
                results[f"{name}/{dataset}"] = measure(makers[name], *data)
                print(f"  [{label}] {name:12s} {dataset:7s} {results[f'{name}/{dataset}']}", file=sys.stderr, flush=True)
    return results


def ensure_anchor_venv() -> Path:
    python = ANCHOR_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {ANCHOR_VENV} (scikit-learn<1.8, metric-learn==0.7.0) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(ANCHOR_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "scikit-learn<1.8", "metric-learn==0.7.0"],
                       check=True)
    return python


def metric_learn_results(algorithms) -> dict:
    python = ensure_anchor_venv()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([str(python), __file__, "--anchors-only", "--only", ",".join(algorithms)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"metric-learn run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cell(r):
    if r is None:
        return "—"
    if "error" in r:
        return f"fails ({r['error'][:40]})"
    return f"{r['accuracy']:.4f} / {r['seconds']:.3f}s"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(ALGORITHMS))
    parser.add_argument("--anchors-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    algorithms = [a for a in args.only.split(",") if a]
    if args.anchors_only:
        import warnings

        warnings.filterwarnings("ignore")
        import metric_learn
        import sklearn

        res = run(metric_learn_makers(), algorithms, "metric-learn")
        res["_versions"] = {"metric_learn": metric_learn.__version__, "sklearn": sklearn.__version__}
        print(json.dumps(res))
        return
    import sklearn
    import torch

    ml = metric_learn_results(algorithms)
    ours_makers, sk_makers = metrix_makers()
    sk = run(sk_makers, algorithms, "scikit-learn")
    ours = run(ours_makers, algorithms, "metrix")
    print(f"\nmetrix vs anchors — {time.strftime('%Y-%m-%d')}, scikit-learn {sklearn.__version__} "
          f"(anchors: metric-learn {ml['_versions']['metric_learn']} on scikit-learn {ml['_versions']['sklearn']}), "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("\ncell = 3-NN test accuracy / fit time; speed-up = anchor time / metrix time\n")
    print("| algorithm | data | metrix | metric-learn | scikit-learn | acc ≥ anchors | speed-up vs metric-learn | vs scikit-learn |")
    print("|---|---|---|---|---|---|---|---|")
    for name in algorithms:
        for dataset in DATASETS:
            key = f"{name}/{dataset}"
            o, m, s = ours.get(key), ml.get(key), sk.get(key)
            ok = []
            for anchor in (m, s):
                if anchor and "accuracy" in anchor and o and "accuracy" in o:
                    ok.append(o["accuracy"] >= anchor["accuracy"] - 1e-12)
            verdict = "yes" if ok and all(ok) else ("no" if ok else "n/a")
            sp = lambda a: f"{a['seconds'] / o['seconds']:.1f}x" if a and "seconds" in a and o and "seconds" in o else "—"
            print(f"| {name} | {dataset} | {cell(o)} | {cell(m)} | {cell(s)} | {verdict} | {sp(m)} | {sp(s)} |")


if __name__ == "__main__":
    main()
