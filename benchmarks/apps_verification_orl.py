"""Face verification and identification on ORL (issue 6, part 1).

Protocol: the 40 ORL identities are shuffled (seed); an embedding is trained on 30 of them; the
10 unseen identities are enrolled in a ``Gallery`` with E = 1 or 5 images each (the rest are
probes). Reported per method (learned embedding, raw pixels, PCA "eigenfaces" fitted on the 30
training identities), averaged over seeds:

- identification: rank-1 accuracy of every probe against the 10 enrolled identities (closed set);
- verification: every (probe, enrolled identity) pair, distance = to the nearest enrolled image:
  ROC AUC, EER, TAR at FAR 1e-1 / 1e-2 / 1e-3 (1e-3 needs >= 1,000 impostor pairs: see counts);
- calibration transfer: a threshold for FAR = 1e-2 chosen on pairs of the *training* identities,
  then the FAR/TAR it actually gives on the unseen ones.

    python benchmarks/apps_verification_orl.py [--seeds 3] [--epochs 40]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA

from metrix.apps.verification import Gallery, calibrate_threshold, verification_metrics
from metrix.datasets import encode_labels, load_image_folder
from metrix.losses import NTXentLoss
from metrix.models import EmbeddingModel
from metrix.training import Trainer

ORL = Path(__file__).resolve().parents[2] / "shared" / "data" / "orl_faces"
IMAGE_SIZE = (56, 46)  # half resolution of the 112 × 92 originals


def pair_distances(gallery: Gallery, probes, probe_ids):
    D, names = gallery.distance_matrix(probes)
    same = np.asarray(probe_ids)[:, None] == np.asarray(names)[None, :]
    return D, same, names


def enrol(embed, X, y, identities, n_enrol, rng):
    """A gallery of ``n_enrol`` random images per identity; the other images become probes."""
    gallery = Gallery()
    probes, probe_ids = [], []
    for ident in identities:
        idx = rng.permutation(np.flatnonzero(y == ident))
        gallery.enroll(str(ident), embed(X[idx[:n_enrol]]))
        probes.append(embed(X[idx[n_enrol:]]))
        probe_ids += [str(ident)] * (len(idx) - n_enrol)
    return gallery, np.concatenate(probes), probe_ids


def evaluate(embed, X, y, train_ids, test_ids, n_enrol, rng):
    """Identification and verification of the unseen identities with ``n_enrol`` images each."""
    gallery, probes, probe_ids = enrol(embed, X, y, test_ids, n_enrol, rng)
    D, same, names = pair_distances(gallery, probes, probe_ids)
    rank1 = float(np.mean(np.asarray(names)[D.argmin(1)] == np.asarray(probe_ids)))
    out = {"rank1": rank1, **verification_metrics(D.ravel(), same.ravel())}
    # threshold for FAR 1e-2 from the same kind of pairs among the training identities
    train_gallery, train_probes, train_ids_of_probes = enrol(embed, X, y, train_ids, n_enrol, rng)
    Dt, St, _ = pair_distances(train_gallery, train_probes, train_ids_of_probes)
    t = calibrate_threshold(Dt.ravel(), St.ravel(), target_far=1e-2)
    out["calibrated_far"] = float(np.mean(D[~same] <= t))
    out["calibrated_tar"] = float(np.mean(D[same] <= t))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    if not ORL.is_dir():
        raise SystemExit(f"ORL faces not found at {ORL}")
    ds = load_image_folder(ORL, IMAGE_SIZE)
    X = ds.X
    y, _ = encode_labels(ds.y)
    results: dict[tuple[str, int], list[dict]] = {}
    train_seconds = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        ids = rng.permutation(40)
        train_ids, test_ids = ids[:30], ids[30:]
        tr = np.isin(y, train_ids)
        torch.manual_seed(seed)
        model = EmbeddingModel("convnet", 64, input_shape=X.shape[1:],
                               input_mean=torch.tensor(X[tr].mean()), input_std=torch.tensor(X[tr].std()))
        start = time.process_time()
        Trainer(model, NTXentLoss(temperature=0.1), epochs=args.epochs, classes_per_batch=10, samples_per_class=5,
                lr=1e-3, seed=seed, progress=False).fit(X[tr], y[tr])
        train_seconds.append(time.process_time() - start)
        flat_train = X[tr].reshape(tr.sum(), -1)
        pca = PCA(n_components=50, random_state=seed).fit(flat_train)
        methods = {
            "metrix embedding (NT-Xent, convnet)": lambda a: model.embed(a).numpy(),
            "raw pixels": lambda a: a.reshape(len(a), -1),
            "PCA eigenfaces (50)": lambda a: pca.transform(a.reshape(len(a), -1)).astype(np.float32),
        }
        for n_enrol in (1, 5):
            for name, embed in methods.items():
                r = evaluate(embed, X, y, train_ids, test_ids, n_enrol, np.random.default_rng(100 + seed))
                results.setdefault((name, n_enrol), []).append(r)
    print(f"\nORL faces, 30 training / 10 unseen identities, {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} images, "
          f"{args.seeds} seeds, {time.strftime('%Y-%m-%d')}; training CPU time "
          f"{np.mean(train_seconds):.0f} s per seed ({args.epochs} epochs, {torch.get_num_threads()} threads)\n")
    print("| method | enrolled/id | rank-1 ident. | ROC AUC | EER | TAR@FAR1e-1 | TAR@FAR1e-2 | TAR@FAR1e-3 | "
          "calibrated FAR (target 1e-2) / TAR | genuine / impostor pairs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (name, n_enrol), rs in results.items():
        m = {k: np.mean([r[k] for r in rs]) for k in rs[0]}
        s = {k: np.std([r[k] for r in rs]) for k in rs[0]}
        print(f"| {name} | {n_enrol} | {m['rank1']:.3f} ± {s['rank1']:.3f} | {m['roc_auc']:.4f} | {m['eer']:.3f} | "
              f"{m['tar_at_far_0.1']:.3f} | {m['tar_at_far_0.01']:.3f} | {m['tar_at_far_0.001']:.3f} | "
              f"{m['calibrated_far']:.3f} / {m['calibrated_tar']:.3f} | "
              f"{int(m['num_genuine_pairs'])} / {int(m['num_impostor_pairs'])} |")


if __name__ == "__main__":
    main()
