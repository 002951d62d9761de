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
