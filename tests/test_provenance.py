"""What an index or gallery was built with travels with it: searching it with another run's embeddings is
refused (unless overridden), enrolling the same samples twice does not weigh them double, and an open-set
question without a threshold says it cannot answer 'unknown'."""

import numpy as np
import pytest
from typer.testing import CliRunner

from metrix.cli import app


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    runs = []
    for seed in (0, 1):
        result = CliRunner().invoke(app, ["train", "--epochs", "1", "--seed", str(seed), "--out", str(out / f"r{seed}"),
                                          "--no-progress"])
        assert result.exit_code == 0, result.output
        runs.append(out / f"r{seed}")
    return runs


def test_an_index_searched_with_another_run_is_refused(two_runs, tmp_path):
    a, b = two_runs
    idx = tmp_path / "g.idx"
    assert CliRunner().invoke(app, ["index", "build", str(a), "--data", "digits", "--out", str(idx)]).exit_code == 0
    ok = CliRunner().invoke(app, ["index", "search", str(a), str(idx), "--query", "digits", "--limit", "2"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, ["index", "search", str(b), str(idx), "--query", "digits", "--limit", "2"])
    assert bad.exit_code != 0 and "built with another run" in bad.output and "--allow-other-run" in bad.output
    forced = CliRunner().invoke(app, ["index", "search", str(b), str(idx), "--query", "digits", "--limit", "2",
                                      "--allow-other-run"])
    assert forced.exit_code == 0, forced.output


def test_a_gallery_used_with_another_run_is_refused_and_duplicates_are_not_enrolled(two_runs, tmp_path):
    from metrix.apps.verification import Gallery

    a, b = two_runs
    probes = tmp_path / "p.npy"
    from sklearn.datasets import load_digits
    np.save(probes, load_digits().data[:5].astype(np.float32))
    gallery = tmp_path / "people.gallery"
    first = CliRunner().invoke(app, ["gallery", "enroll", str(a), str(gallery), "--data", str(probes),
                                     "--identity", "alice"])
    assert first.exit_code == 0 and "5 samples" in first.output, first.output
    again = CliRunner().invoke(app, ["gallery", "enroll", str(a), str(gallery), "--data", str(probes),
                                     "--identity", "alice"])
    assert again.exit_code == 0 and "0 samples; 5 already enrolled, skipped" in again.output, again.output
    assert len(Gallery.load(gallery).samples("alice")) == 5
    other = CliRunner().invoke(app, ["gallery", "identify", str(b), str(gallery), "--data", str(probes)])
    assert other.exit_code != 0 and "built with another run" in other.output


def test_gallery_enroll_skips_repeated_samples_and_identify_warns_without_threshold():
    from metrix.apps.verification import Gallery

    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    g = Gallery()
    assert g.enroll("a", np.concatenate([x, x[:2]])) == 4  # repeats inside one call
    assert g.enroll("a", x[1:3]) == 0 and g.enroll("a", x[:1] + 1) == 1  # repeats of held samples; a new one
    assert g.enroll("b", x) == 4  # the same vector may belong to two identities (the caller's decision)
    with pytest.warns(UserWarning, match="never answers 'unknown'"):
        g.identify(x[:1])
    g.threshold = 0.5
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g.identify(x[:1])
