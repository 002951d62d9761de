"""metrix gallery enroll / calibrate / verify / identify, and metrix ood."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from metrix.apps.verification import GALLERY_METRICS
from metrix.cli.common import ALLOW_OTHER_RUN, DEVICE, app, command_group, echo_rows, open_run
from metrix.neighbors import KNN_METRICS


gallery_app = command_group(help="Enrol identities with a trained run, then verify (1:1) and identify (1:N).")
app.add_typer(gallery_app, name="gallery")


@gallery_app.command("enroll")
def gallery_enroll(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder written by 'metrix train' (or a folder holding one run): its model embeds the samples."),
    gallery: Path = typer.Argument(..., help="Gallery file (created if missing; safetensors, checksummed)."),
    data: str = typer.Option(..., help="Samples: a folder of class sub-folders (each folder = one identity), .npz, .csv, or a .npy with --identity."),
    identity: Optional[str] = typer.Option(None, help="Enrol every sample of --data as this one identity."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    metric: Optional[str] = typer.Option(None, help=f"A new gallery's metric: {', '.join(GALLERY_METRICS)} (default euclidean)."),
    allow_other_run: bool = ALLOW_OTHER_RUN,
    device: str = DEVICE,
) -> None:
    """Add identities to a gallery (no retraining needed for new people)."""
    from metrix.jobs.verification import enroll

    r = enroll(gallery, open_run(run, device), data, identity, label_column, allow_other_run, metric)
    skipped = f"; {r['duplicates']} already enrolled, skipped" if r["duplicates"] else ""
    typer.echo(f"enrolled {len(r['added'])} identities ({sum(r['added'].values())} samples{skipped}) -> {gallery}")


@gallery_app.command("calibrate")
def gallery_calibrate(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder written by 'metrix train' (or a folder holding one run): its model embeds the samples."),
    gallery: Path = typer.Argument(..., help="Gallery file."),
    data: str = typer.Option(..., help="Labelled samples (people not in the gallery are fine): all their pairs are scored."),
    far: Optional[float] = typer.Option(None, help="Target false-accept rate (default: the threshold of best pair accuracy)."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    allow_other_run: bool = ALLOW_OTHER_RUN,
    device: str = DEVICE,
) -> None:
    """Choose the accept threshold on labelled pairs, for a target false-accept rate."""
    from metrix.jobs.verification import calibrate

    r = calibrate(gallery, open_run(run, device), data, far, label_column, allow_other_run=allow_other_run)
    typer.echo(f"threshold {r['threshold']:.4f}: FAR {r['far']:.4f}, TAR {r['tar']:.4f} on {r['pairs']} pairs -> {gallery}")


@gallery_app.command("verify")
def gallery_verify(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder written by 'metrix train' (or a folder holding one run): its model embeds the samples."),
    gallery: Path = typer.Argument(..., help="Gallery file with a threshold (see 'calibrate')."),
    data: str = typer.Option(..., help="Probe samples: .npy of raw inputs, or a dataset."),
    identity: str = typer.Option(..., help="Claimed identity."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    allow_other_run: bool = ALLOW_OTHER_RUN,
    device: str = DEVICE,
) -> None:
    """1:1 — is each probe the claimed identity?"""
    from metrix.jobs.verification import verify

    results = verify(gallery, open_run(run, device), data, identity, label_column, allow_other_run)
    echo_rows(results, as_json,
              lambda r: f"sample {r['sample']:>5}  {'ACCEPT' if r['accepted'] else 'reject'}  distance {r['distance']:.4f}")


@gallery_app.command("identify")
def gallery_identify(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder written by 'metrix train' (or a folder holding one run): its model embeds the samples."),
    gallery: Path = typer.Argument(..., help="Gallery file."),
    data: str = typer.Option(..., help="Probe samples: .npy of raw inputs, or a dataset."),
    k: int = typer.Option(1, "-k", "--k", min=1, help="Candidates per probe."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N probes."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    allow_other_run: bool = ALLOW_OTHER_RUN,
    device: str = DEVICE,
) -> None:
    """1:N — who is each probe? 'unknown' when the best match is beyond the threshold (without a threshold,
    every probe gets its nearest identity, and a warning says so)."""
    from metrix.jobs.verification import identify

    results = identify(gallery, open_run(run, device), data, k, label_column, limit, allow_other_run)
    echo_rows(results, as_json, _identified)


def _identified(r: dict) -> str:
    truth = f" (label {r['label']})" if "label" in r else ""
    cands = ", ".join(f"{c['identity']} {c['distance']:.3f}" for c in r["candidates"])
    return f"sample {r['sample']:>5}{truth}: {r['identity'] or 'unknown'}   [{cands}]"


@app.command("ood")
def ood(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder written by 'metrix train': its model embeds every set."),
    fit_data: str = typer.Option(..., help="In-distribution training data (labelled for the Mahalanobis detector)."),
    in_data: str = typer.Option(..., help="Held-out in-distribution samples."),
    ood_data: str = typer.Option(..., help="Out-of-distribution samples (a dataset or a .npy of raw inputs)."),
    detector: str = typer.Option("mahalanobis", help="'mahalanobis' (class means + shared shrunk covariance) or 'knn' (k-th neighbour distance)."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Neighbour used by the knn detector."),
    metric: str = typer.Option("euclidean", help="How the knn detector compares: "
                                                 f"{', '.join(m for m in KNN_METRICS if m != 'dot')}."),
    label_column: str = typer.Option("label", help="Label column of a CSV file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    device: str = DEVICE,
) -> None:
    """Score OOD detection in a learned space: AUROC and FPR at 95% TPR."""
    from metrix.jobs.verification import ood_evaluate

    r = ood_evaluate(open_run(run, device), fit_data, in_data, ood_data, detector, k, label_column, metric)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    typer.echo(f"{detector}: AUROC {r['auroc']:.4f}, FPR@95%TPR {r['fpr_at_95_tpr']:.4f} "
               f"({r['num_in']} in-distribution, {r['num_ood']} OOD samples)")
