import numpy as np
import pytest

from metrix.datasets import encode_labels, load_dataset, stratified_split
from tests.conftest import SHARED_DATA


def test_digits():
    ds = load_dataset("digits")
    assert ds.X.shape == (1797, 64) and ds.X.dtype == np.float32 and set(np.unique(ds.y)) == set(range(10))


def test_npz_and_csv(tmp_path):
    X = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    y = np.array(["a", "b"] * 5)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    ds = load_dataset(str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(ds.X, X) and np.testing.assert_array_equal(ds.y, y)
    (tmp_path / "d.csv").write_text("f1,label,f2\n1.5,7,2\n0,3,1\n")
    ds = load_dataset(str(tmp_path / "d.csv"))
    np.testing.assert_array_equal(ds.X, [[1.5, 2], [0, 1]]) and list(ds.y) == [7, 3]
    with pytest.raises(ValueError, match="no column 'target'"):
        load_dataset(str(tmp_path / "d.csv"), label_column="target")


def test_bad_files(tmp_path):
    np.savez(tmp_path / "bad.npz", features=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="must contain arrays 'X' and 'y'"):
        load_dataset(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "nan.npz", X=np.array([[np.nan]]), y=np.array([0]))
    with pytest.raises(ValueError, match="NaN"):
        load_dataset(str(tmp_path / "nan.npz"))
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_dataset(str(tmp_path / "corrupt.npz"))
    (tmp_path / "ragged.csv").write_text("a,label\n1,2\n3\n")
    with pytest.raises(ValueError, match="line 3"):
        load_dataset(str(tmp_path / "ragged.csv"))
    with pytest.raises(FileNotFoundError, match="no dataset"):
        load_dataset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unsupported"):
        (tmp_path / "x.txt").write_text("")
        load_dataset(str(tmp_path / "x.txt"))


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            size = (6, 5) if i else (8, 7)  # mixed sizes are resized to the first one
            Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    ds = load_dataset(str(tmp_path))
    assert ds.X.shape == (6, 1, 8, 7) and list(ds.y) == ["cat"] * 3 + ["dog"] * 3
    assert 0 <= ds.X.min() and ds.X.max() <= 1
    (tmp_path / "dog" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read image"):
        load_dataset(str(tmp_path))


@pytest.mark.skipif(not (SHARED_DATA / "orl_faces").is_dir(), reason="shared ORL faces not present")
def test_real_image_folder_orl_faces():
    ds = load_dataset(str(SHARED_DATA / "orl_faces"))
    assert ds.X.shape == (400, 1, 112, 92) and len(np.unique(ds.y)) == 40


def test_encode_and_split():
    codes, classes = encode_labels(["b", "a", "b", "c"])
    assert list(codes) == [1, 0, 1, 2] and list(classes) == ["a", "b", "c"]
    y = np.repeat(np.arange(4), 10)
    tr, te = stratified_split(y, 0.3, 0)
    assert len(te) == 12 and set(y[te]) == set(range(4)) and not set(tr) & set(te)
    with pytest.raises(ValueError, match="at least 2 samples"):
        stratified_split(np.array([0, 0, 1]), 0.3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        stratified_split(np.zeros(5), 0.3)


@pytest.mark.skipif(not (SHARED_DATA / "fashion_mnist").is_dir(), reason="shared Fashion-MNIST not present")
def test_fashion_mnist_local_copy():
    from metrix.datasets import load_fashion_mnist

    test = load_fashion_mnist(SHARED_DATA / "fashion_mnist", "test")
    assert test.X.shape == (10000, 1, 28, 28) and test.X.dtype == np.float32
    assert np.bincount(test.y).tolist() == [1000] * 10
    assert 0.0 <= test.X.min() and test.X.max() <= 1.0


def test_idx_reader_rejects_bad_files(tmp_path):
    from metrix.datasets import load_fashion_mnist, read_idx

    (tmp_path / "x").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "x")
    (tmp_path / "y").write_bytes(b"hello")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "y")
    with pytest.raises(FileNotFoundError, match="download_missing"):
        load_fashion_mnist(tmp_path, "train")


@pytest.mark.skipif(not (SHARED_DATA / "omniglot").is_dir(), reason="shared Omniglot not present")
def test_omniglot_local_copy():
    from metrix.datasets import load_omniglot

    ev = load_omniglot(SHARED_DATA / "omniglot", "evaluation")
    assert ev.X.shape == (13180, 1, 28, 28)
    assert len(np.unique(ev.y)) == 659
    assert ev.X.mean() < 0.5  # strokes are 1 on a 0 background after inversion


# --- text datasets ------------------------------------------------------------------------------

class _FakeResponse:
    def __init__(self, data):
        self.data = data

    def read(self):
        return self.data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _serve(monkeypatch, files: dict[str, bytes]):
    """Answer urlopen(url) with files[url] (the official addresses), recording what was asked."""
    import urllib.request

    asked = []

    def fake_urlopen(url, timeout=None):
        asked.append(url)
        return _FakeResponse(files[url])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return asked


@pytest.mark.skipif(not (SHARED_DATA / "banking77").is_dir(), reason="shared BANKING77 not present")
def test_banking77_local_copy_and_checksummed_download(tmp_path, monkeypatch):
    from metrix.datasets import BANKING77_URL, load_banking77

    train, test = load_banking77(SHARED_DATA / "banking77", "train"), load_banking77(SHARED_DATA / "banking77", "test")
    assert (len(train), len(test)) == (10003, 3080) and len(train.classes) == 77
    assert np.bincount(test.y, minlength=77).tolist() == [40] * 77
    assert any("," in t for t in train.texts)  # quoted CSV fields are read whole
    files = {BANKING77_URL + n: (SHARED_DATA / "banking77" / n).read_bytes() for n in ("test.csv", "categories.json")}
    asked = _serve(monkeypatch, files)
    again = load_banking77(tmp_path, "test", download_missing=True)
    assert again.texts == test.texts and sorted(asked) == sorted(files)
    files[BANKING77_URL + "test.csv"] = b"text,category\nforged,card_arrival\n"
    with pytest.raises(ValueError, match="sha256"):
        load_banking77(tmp_path / "other", "test", download_missing=True)


@pytest.mark.skipif(not (SHARED_DATA / "trec").is_dir(), reason="shared TREC not present")
def test_trec_local_copy_and_download(tmp_path, monkeypatch):
    from metrix.datasets import TREC_FILES, TREC_URL, load_trec

    coarse, fine = load_trec(SHARED_DATA / "trec", "test"), load_trec(SHARED_DATA / "trec", "test", fine=True)
    assert len(coarse) == len(fine) == 500 and len(coarse.classes) == 6 and len(fine.classes) == 50
    assert np.bincount(coarse.y).tolist() == [9, 138, 94, 65, 81, 113]  # ABBR DESC ENTY HUM LOC NUM
    assert load_trec(SHARED_DATA / "trec", "train").texts[0] == "How did serfdom develop in and then leave Russia ?"
    files = {TREC_URL + name: (SHARED_DATA / "trec" / name).read_bytes() for name, _ in TREC_FILES.values()}
    _serve(monkeypatch, files)
    assert load_trec(tmp_path, "test", download_missing=True).texts == coarse.texts


@pytest.mark.skipif(not (SHARED_DATA / "stsb").is_dir(), reason="shared STS-B not present")
def test_stsb_local_copy_and_archive_download(tmp_path, monkeypatch):
    import hashlib
    import io
    import tarfile

    import metrix.datasets as d

    test = d.load_stsb(SHARED_DATA / "stsb", "test")
    assert len(test) == 1379 and test.scores.min() == 0 and test.scores.max() == 5
    assert (test.first[0], test.second[0], test.scores[0]) == ("A girl is styling her hair.", "A girl is brushing her hair.", 2.5)
    buf = io.BytesIO()  # an archive laid out like the official one
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split in ("train", "dev", "test"):
            tar.add(SHARED_DATA / "stsb" / f"sts-{split}.csv", arcname=f"stsbenchmark/sts-{split}.csv")
    monkeypatch.setattr(d, "STSB_MD5", hashlib.md5(buf.getvalue()).hexdigest())
    _serve(monkeypatch, {d.STSB_URL: buf.getvalue()})
    again = d.load_stsb(tmp_path, "test", download_missing=True)
    assert again.first == test.first and np.array_equal(again.scores, test.scores)
    assert (tmp_path / "sts-train.csv").is_file()


def test_text_loaders_reject_bad_files(tmp_path):
    from metrix.datasets import load_stsb, load_text_csv, load_trec

    (tmp_path / "sts-test.csv").write_text("genre\tfile\t2012\t1\t2.5\tonly one sentence\n")
    with pytest.raises(ValueError, match="7 tab-separated"):
        load_stsb(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        load_stsb(tmp_path, "validation")
    (tmp_path / "train_5500.label").write_text("no label here\n", encoding="latin-1")
    with pytest.raises(ValueError, match="COARSE"):
        load_trec(tmp_path, "train")
    (tmp_path / "t.csv").write_text("sentence,label\nhi,a\n")
    with pytest.raises(ValueError, match="columns"):
        load_text_csv(tmp_path / "t.csv")
    with pytest.raises(FileNotFoundError, match="download_missing"):
        load_trec(tmp_path / "none", "test")


# --- downloads: pinned digests and no archive member outside the data folder ---------------------
@pytest.mark.parametrize("member", ["ml-100k/../../evil", "/etc/passwd", "ml-100k/a/../../x", "ml-100k/C:evil",
                                    "ml-100k/..", "ml-100k/sub/u.data", "other/u.data"])
def test_archive_members_outside_the_folder_are_refused(member):
    from metrix.datasets import archive_member_name

    with pytest.raises(ValueError, match="refusing the archive"):
        archive_member_name(member, prefix="ml-100k/")


def test_archive_member_names_that_stay_inside():
    from metrix.datasets import archive_member_name

    assert archive_member_name("ml-100k/u.data", prefix="ml-100k/") == "u.data"
    assert archive_member_name("ml-100k/", prefix="ml-100k/") is None


def test_movielens_download_refuses_zip_slip_and_unpinned_bytes(tmp_path, monkeypatch):
    """The real extraction code on archives served from memory: a ../ member is refused and nothing is
    written; a member whose bytes differ from the pinned SHA-256 is refused and nothing is written."""
    import hashlib
    import io
    import zipfile

    from metrix import datasets
    from metrix.apps import recommend

    def archive(members):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return buf.getvalue()

    pinned = {"u.data": b"1\t1\t5\t0\n"}
    monkeypatch.setattr(recommend, "MOVIELENS_100K_FILES", {"u.data": hashlib.sha256(pinned["u.data"]).hexdigest()})
    served = {}
    monkeypatch.setattr(datasets, "fetch_archive", lambda url, md5=None: served["zip"])
    out = tmp_path / "ml"
    served["zip"] = archive({"ml-100k/u.data": pinned["u.data"], "ml-100k/../../evil.txt": b"x"})
    with pytest.raises(ValueError, match="outside"):
        recommend._ensure_movielens(out, "u.data", download_missing=True)
    assert not (tmp_path / "evil.txt").exists() and not out.exists()
    served["zip"] = archive({"ml-100k/u.data": b"2\t2\t1\t0\n"})
    with pytest.raises(ValueError, match="pinned sha256"):
        recommend._ensure_movielens(out, "u.data", download_missing=True)
    assert not (out / "u.data").exists()
    served["zip"] = archive({"ml-100k/u.data": pinned["u.data"], "ml-100k/allbut.pl": b"#!"})
    recommend._ensure_movielens(out, "u.data", download_missing=True)
    assert (out / "u.data").read_bytes() == pinned["u.data"] and not (out / "allbut.pl").exists()


def test_pinned_digests_match_the_local_copies_of_the_official_files():
    """The SHA-256 pins are those of the official files (the shared copies are byte-identical to them)."""
    import hashlib

    from metrix import datasets
    from metrix.apps import recommend
    from tests.conftest import SHARED_DATA

    pins = [(SHARED_DATA / "fashion_mnist" / n, d[1]) for n, d in datasets.FASHION_MNIST_FILES.items()]
    pins += [(SHARED_DATA / "omniglot" / n, d) for n, d in datasets.OMNIGLOT_FILES.values()]
    pins += [(SHARED_DATA / "stsb" / n, d) for n, d in datasets.STSB_FILES.items()]
    pins += [(SHARED_DATA / "movielens_100k" / n, d) for n, d in recommend.MOVIELENS_100K_FILES.items()]
    present = [(p, d) for p, d in pins if p.is_file()]
    if not present:
        pytest.skip("../shared/data is not here")
    for path, digest in present:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path


def test_a_download_without_a_pinned_digest_is_refused():
    from metrix.datasets import fetch_bytes

    with pytest.raises(ValueError, match="pinned sha256"):
        fetch_bytes("https://example.invalid/x", sha256=None)


# --- public sets by name, IDX files, and an official test set for `metrix train` ----------------------
def _write_idx(path, array):
    import gzip
    import struct

    dims = array.shape
    header = struct.pack(">BBBB", 0, 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_load_with_their_labels(tmp_path):
    from metrix.datasets import load_dataset

    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "my-images-idx3-ubyte.gz", rng.integers(0, 256, size=(7, 5, 4)))
    with pytest.raises(FileNotFoundError, match="no labels beside"):
        load_dataset(str(tmp_path / "my-images-idx3-ubyte.gz"))
    _write_idx(tmp_path / "my-labels-idx1-ubyte.gz", np.arange(7) % 3)
    ds = load_dataset(str(tmp_path / "my-images-idx3-ubyte.gz"))
    assert ds.X.shape == (7, 1, 5, 4) and ds.y.tolist() == [0, 1, 2, 0, 1, 2, 0] and float(ds.X.max()) <= 1.0


def test_named_sets_say_where_they_are_expected(tmp_path, monkeypatch):
    from metrix.datasets import load_dataset

    monkeypatch.setenv("METRIX_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"fashion-mnist is not at {tmp_path}/fashion_mnist"):
        load_dataset("fashion-mnist:test")
    (tmp_path / "mnist").mkdir()
    _write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", np.zeros((4, 28, 28)))
    _write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.arange(4))
    ds = load_dataset("mnist:test")
    assert ds.name == "mnist-test" and ds.X.shape == (4, 1, 28, 28)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_dataset("mnist:valid")


def test_an_image_size_is_honoured_by_every_kind_of_image_data(tmp_path, monkeypatch):
    """A requested size used to apply to image folders only: a named set or an IDX file silently kept its own."""
    from PIL import Image

    from metrix.datasets import load_dataset

    monkeypatch.setenv("METRIX_DATA", str(tmp_path))
    (tmp_path / "mnist").mkdir()
    stripes = np.zeros((4, 28, 28))
    stripes[:, :, ::2] = 255  # alternating columns: a 2× shrink must average them, not pick every other one
    _write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", stripes)
    _write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.arange(4))
    ds = load_dataset("mnist:test", image_size=(14, 14))
    assert ds.X.shape == (4, 1, 14, 14) and ds.info["image_shape"] == [14, 14]
    np.testing.assert_allclose(ds.X[:, :, 2:-2, 2:-2], 0.5, atol=1e-6)  # antialiased: the columns' mean
    assert load_dataset("mnist:test", image_size=(28, 28)).X.shape == (4, 1, 28, 28)
    for person in ("s1", "s2"):
        (tmp_path / "orl_faces" / person).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((12, 10), 100, np.uint8)).save(tmp_path / "orl_faces" / person / f"{i}.pgm")
    assert load_dataset("orl", image_size=(6, 5)).X.shape == (4, 1, 6, 5)
    np.savez(tmp_path / "rows.npz", X=np.zeros((3, 4)), y=np.arange(3))
    with pytest.raises(ValueError, match="not images: an image size applies to image data only"):
        load_dataset(str(tmp_path / "rows.npz"), image_size=(2, 2))
    for bad in ((0, 14), (28, 100_000)):
        with pytest.raises(ValueError, match="image_size must be"):
            load_dataset("mnist:test", image_size=bad)


@pytest.mark.skipif(not (SHARED_DATA / "orl_faces").is_dir(), reason="shared ORL faces not present")
def test_named_public_sets_from_the_shared_copies(monkeypatch):
    from metrix.datasets import load_dataset

    monkeypatch.setenv("METRIX_DATA", str(SHARED_DATA))
    orl = load_dataset("orl")
    assert orl.X.shape == (400, 1, 112, 92) and len(set(orl.y.tolist())) == 40
    fashion = load_dataset("fashion-mnist:test")
    assert fashion.X.shape == (10000, 1, 28, 28) and np.bincount(fashion.y).tolist() == [1000] * 10


def test_train_with_an_official_test_set(tmp_path):
    from metrix.jobs.train import TrainConfig, evaluate, train

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6))
    for name, n in (("train", 80), ("test", 40)):
        y = np.arange(n) % 4
        np.savez(tmp_path / f"{name}.npz", X=(centres[y] + 0.2 * rng.normal(size=(n, 6))).astype(np.float32), y=y)
    cfg = TrainConfig.from_sources(None, data=str(tmp_path / "train.npz"), test_data=str(tmp_path / "test.npz"),
                                   epochs=2, out=str(tmp_path / "runs"), progress=False, classes_per_batch=4,
                                   samples_per_class=4)
    lines = []
    result = train(cfg, echo=lines.append)
    assert "train 80 / test 40 (test set" in lines[0]
    again = evaluate(result["run_dir"])  # the run's own test set queries its training data, as in train
    assert again["split"] == "test" and again["map_at_r"] == pytest.approx(result["after"]["map_at_r"], abs=1e-6)
    bad = TrainConfig.from_sources(None, data="digits", test_data=str(tmp_path / "test.npz"), epochs=1,
                                   out=str(tmp_path / "runs"), progress=False)
    with pytest.raises(ValueError, match="must match"):
        train(bad, echo=lambda *a: None)


def test_one_label_encoder_shares_codes_across_arrays():
    import torch

    from metrix._validation import label_codes

    (a, b), classes = label_codes(np.array(["cat", "dog", "cat"]), ["emu", "dog"])
    assert classes.tolist() == ["cat", "dog", "emu"] and a.tolist() == [0, 1, 0] and b.tolist() == [2, 1]
    (c,), classes = label_codes(torch.tensor([2**40, 7, 7]))
    assert c.dtype == np.int64 and c.tolist() == [1, 0, 0] and classes.tolist() == [7, 2**40]
    with pytest.raises(ValueError, match="1-D"):
        label_codes(np.zeros((2, 2)))


def test_nested_image_folders_are_classes_by_their_leaf_folder(tmp_path):
    """Omniglot's alphabet/character/image tree: every folder that holds images is a class, named by its path."""
    from PIL import Image

    from metrix.datasets import load_dataset

    rng = np.random.default_rng(0)
    for alphabet, characters in (("Latin", ("c01", "c02")), ("Greek", ("c01",))):
        for character in characters:
            folder = tmp_path / "tree" / alphabet / character
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (6, 5), dtype=np.uint8)).save(folder / f"{i}.png")
    ds = load_dataset(str(tmp_path / "tree"))
    assert ds.X.shape == (9, 1, 6, 5)
    assert sorted(set(ds.y.tolist())) == ["Greek/c01", "Latin/c01", "Latin/c02"]  # same character names stay apart
    Image.fromarray(np.zeros((6, 5), dtype=np.uint8)).save(tmp_path / "tree" / "stray.png")
    with pytest.raises(ValueError, match="holds images directly"):
        load_dataset(str(tmp_path / "tree"))
