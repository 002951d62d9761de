"""Loading labelled data for training and evaluation.

``load_dataset(spec)`` understands:

* ``"digits"``: scikit-learn's bundled 1,797 8×8 handwritten digits (offline, the default);
* a public set by name, with an optional split after a colon: ``fashion-mnist`` (``:train``, ``:test``),
  ``mnist`` (``:test``, the MNIST test set), ``omniglot`` (``:background``, ``:evaluation``), ``orl`` (the ORL
  faces); each is read from ``$METRIX_DATA/<folder>`` (default ``data/<folder>``: ``fashion_mnist``, ``mnist``,
  ``omniglot``, ``orl_faces``), where the ``download_missing`` loaders put it;
* an IDX image file (``...-images-idx3-ubyte[.gz]``) with its labels file beside it (``...-labels-idx1-ubyte``);
* a folder with one sub-folder of images per class (PNG, JPEG, PGM, ...), loaded as grey images;
* an ``.npz`` file with arrays ``X`` (features or images) and ``y`` (labels);
* a ``.csv`` file with a header, a label column (``label_column``, default ``"label"``) and numeric features.

Labels may be ints of any size or strings; :func:`encode_labels` maps them to 0..C−1.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metrix._validation import label_codes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}


@dataclass
class Dataset:
    X: np.ndarray  # float32, (n, ...) one row per sample
    y: np.ndarray  # labels as given (ints or strings)
    name: str
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        # every loader ends here: a file whose X and y disagree never trains on a silent prefix of it
        if len(self.X) != len(self.y):
            raise ValueError(f"{self.name}: X has {len(self.X)} samples but y has {len(self.y)} labels; "
                             "each sample needs exactly one label")
        if len(self.X) == 0:
            raise ValueError(f"{self.name}: the dataset is empty (no samples)")

    def __len__(self) -> int:
        return len(self.X)


def encode_labels(labels) -> tuple[np.ndarray, np.ndarray]:
    """Map labels of any type to int64 codes 0..C−1; returns ``(codes, classes)``."""
    (codes,), classes = label_codes(labels)
    return codes, classes


def load_digits_dataset() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    return Dataset(d.data.astype(np.float32), d.target.astype(np.int64), "digits", {"image_shape": [8, 8]})


def image_classes(root: Path) -> list[tuple[str, list[Path]]]:
    """``(label, image files)`` for every folder under ``root`` that holds images, in sorted order: the label is
    the folder's path below ``root`` (``cat`` for ``root/cat/``; ``Latin/character01`` in Omniglot's
    alphabet/character/image tree). Symbolic links are not followed out of ``root``."""
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs.sort()
        here = Path(folder)
        images = sorted(here / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES)
        if images and here != root:
            found.append((here.relative_to(root).as_posix(), images))
        elif images:
            raise ValueError(f"{root} holds images directly; put each class in a sub-folder ({root}/<class>/<image>)")
    return sorted(found)


def load_image_folder(path, image_size: tuple[int, int] | None = None) -> Dataset:
    """Grey images from ``path/<class>/<image>``, or any deeper tree whose leaf folders are the classes
    (``path/<alphabet>/<character>/<image>``: label ``alphabet/character``); all are resized to
    ``image_size`` (H, W), by default the size of the first image."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    classes = image_classes(root)
    if not classes:
        if not any(p.is_dir() for p in root.iterdir()):
            raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
        raise ValueError(f"no images with suffix {sorted(IMAGE_SUFFIXES)} under {root}")
    images, labels = [], []
    for label, files in classes:
        for file in files:
            try:
                with Image.open(file) as im:
                    im = im.convert("L")
                    if image_size is None:
                        image_size = (im.height, im.width)
                    if (im.height, im.width) != tuple(image_size):
                        im = im.resize((image_size[1], image_size[0]), Image.BILINEAR)
                    images.append(np.asarray(im, dtype=np.float32) / 255.0)
            except (UnidentifiedImageError, OSError) as exc:
                raise ValueError(f"cannot read image {file}: {exc}") from exc
            labels.append(label)
    X = np.stack(images)[:, None]  # (n, 1, H, W)
    return Dataset(X, np.asarray(labels), root.name, {"image_shape": list(image_size)})


def load_npz(path) -> Dataset:
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError(f"cannot read {path} as .npz: it is not a NumPy zip archive (damaged or another format)")
    try:
        with np.load(path, allow_pickle=False) as f:  # never unpickle user files
            if "X" not in f or "y" not in f:
                raise ValueError(f"{path} must contain arrays 'X' and 'y', found {sorted(f.files)}")
            X, y = f["X"], f["y"]
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read {path} as .npz: {exc}") from exc
    if X.dtype.kind not in "fiub":
        raise ValueError(f"{path}: X must be numeric, got dtype {X.dtype}")
    return Dataset(X.astype(np.float32), y.reshape(-1), Path(path).stem)


def load_csv(path, label_column: str = "label") -> Dataset:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if len(rows) < 2:
        raise ValueError(f"{path} needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise ValueError(f"{path} has no column {label_column!r}; columns are {header}; pass --label-column")
    li = header.index(label_column)
    labels, feats = [], []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {n}: {len(row)} fields, header has {len(header)}")
        labels.append(row[li].strip())
        try:
            feats.append([float(v) for i, v in enumerate(row) if i != li])
        except ValueError as exc:
            raise ValueError(f"{path}, line {n}: non-numeric feature ({exc})") from exc
    y = np.asarray(labels)
    try:  # integer labels stay integers
        y = y.astype(np.int64)
    except ValueError:
        pass
    return Dataset(np.asarray(feats, dtype=np.float32), y, Path(path).stem)


DATA_ENV = "METRIX_DATA"
# name -> (folder under $METRIX_DATA, loader(root, split or None, image_size or None)); a loader that ignores
# image_size leaves the resizing to load_dataset
NAMED_DATASETS = {
    "fashion-mnist": ("fashion_mnist", lambda root, split, size: load_fashion_mnist(root, split or "train")),
    "mnist": ("mnist", lambda root, split, size: load_mnist(root, split or "test")),
    "omniglot": ("omniglot", lambda root, split, size: load_omniglot(root, split or "background")),
    "orl": ("orl_faces", lambda root, split, size: _whole(load_image_folder(root, size), "orl", split)),
}


def _whole(ds: Dataset, name: str, split: str | None) -> Dataset:
    if split not in (None, "all"):
        raise ValueError(f"{name} has no official splits (got {split!r}); it is split by the commands that use it")
    return ds


def data_root(name: str) -> Path:
    """Where the public set ``name`` is read from: ``$METRIX_DATA/<folder>`` (default ``data/<folder>``)."""
    return Path(os.environ.get(DATA_ENV, "data")) / NAMED_DATASETS[name][0]


def load_dataset(spec: str, label_column: str = "label", image_size: tuple[int, int] | None = None) -> Dataset:
    """Load ``"digits"``, a public set by name (``fashion-mnist:test``), an IDX file, an image folder, an
    ``.npz`` or a ``.csv`` (see module docstring)."""
    name, _, split = str(spec).partition(":")
    if spec == "digits":
        ds = load_digits_dataset()
    elif name in NAMED_DATASETS and not Path(spec).exists():
        root = data_root(name)
        if not root.is_dir():
            raise FileNotFoundError(f"{name} is not at {root}: set {DATA_ENV} to the folder that holds "
                                    f"{NAMED_DATASETS[name][0]}/, or download it there")
        ds = NAMED_DATASETS[name][1](root, split or None, image_size)
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"no dataset at {spec!r}: use 'digits', {', '.join(NAMED_DATASETS)} (with "
                                    "':split'), a class-folder of images, an IDX file, an .npz or a .csv")
        if path.is_dir():
            ds = load_image_folder(path, image_size)
        elif "-idx3-ubyte" in path.name:
            ds = load_idx_pair(path)
        elif path.suffix == ".npz":
            ds = load_npz(path)
        elif path.suffix == ".csv":
            ds = load_csv(path, label_column)
        else:
            raise ValueError(f"unsupported dataset file {path.name!r}: expected .npz, .csv, an IDX file or a folder")
    if len(ds) == 0:
        raise ValueError(f"dataset {spec!r} is empty")
    if not np.isfinite(ds.X).all():
        raise ValueError(f"dataset {spec!r} contains NaN or inf features")
    return ds if image_size is None else resize_images(ds, image_size)


def resize_images(ds: Dataset, image_size: tuple[int, int]) -> Dataset:
    """``ds`` with its images resized to ``image_size`` (H, W) by :func:`resize_array`. Data that are not images
    (rows of features) are refused rather than left at their size."""
    if ds.X.ndim not in (3, 4):
        raise ValueError(f"{ds.name} holds rows of {ds.X.shape[1]} features, not images: an image size applies to "
                         "image data only (an image folder, an IDX file, a named image set, an .npz of images)")
    X = resize_array(ds.X, image_size)
    return ds if X is ds.X else Dataset(X, ds.y, ds.name, {**ds.info, "image_shape": list(X.shape[-2:])})


MAX_IMAGE_SIDE = 8192  # a typo such as --image-size 28000 28 would otherwise try to allocate the whole set at it


def resize_array(X: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Images (n, C, H, W) or (n, H, W) resized to ``image_size`` (H, W): bilinear, antialiased when shrinking;
    ``X`` itself when it has that size already."""
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1 or max(size) > MAX_IMAGE_SIDE:
        raise ValueError(f"image_size must be (height, width), each from 1 to {MAX_IMAGE_SIDE} pixels, got {image_size}")
    if X.ndim not in (3, 4):
        raise ValueError(f"images must have shape (n, C, H, W) or (n, H, W), got {X.shape}")
    if tuple(X.shape[-2:]) == size:
        return X
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    x = x[:, None] if x.ndim == 3 else x
    parts = [F.interpolate(x[i:i + 4096], size=size, mode="bilinear", align_corners=False, antialias=True)
             for i in range(0, len(x), 4096)]  # chunks: the interpolation's temporaries stay small
    out = torch.cat(parts)
    return (out[:, 0] if X.ndim == 3 else out).numpy()


def load_idx_pair(images) -> Dataset:
    """IDX images (``*-images-idx3-ubyte[.gz]``) and the labels file beside them (``*-labels-idx1-ubyte[.gz]``),
    images scaled to [0, 1], shape (n, 1, H, W)."""
    images = Path(images)
    labels = images.with_name(images.name.replace("images-idx3", "labels-idx1"))
    if not labels.is_file():
        raise FileNotFoundError(f"no labels beside {images}: expected {labels}")
    X = read_idx(images)
    if X.ndim != 3:
        raise ValueError(f"{images} is not an IDX image file (shape {X.shape})")
    name = images.name.split("-images")[0]
    return Dataset(X.astype(np.float32)[:, None] / 255.0, read_idx(labels).astype(np.int64), name,
                   {"image_shape": list(X.shape[1:])})


def load_mnist(root, split: str = "test") -> Dataset:
    """MNIST from the official gzip IDX files in ``root`` (``split`` 'train' or 'test')."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    ds = load_idx_pair(Path(root) / f"{prefix}-images-idx3-ubyte.gz")
    return Dataset(ds.X, ds.y, f"mnist-{split}", ds.info)


def stratified_split(y, test_size: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified train/test split (every class in both parts where possible)."""
    from sklearn.model_selection import train_test_split

    codes, classes = encode_labels(y)
    counts = np.bincount(codes)
    if len(classes) < 2:
        raise ValueError("a split for metric learning needs at least 2 classes")
    if counts.min() < 2:
        raise ValueError(f"every class needs at least 2 samples for a stratified split; class {classes[counts.argmin()]!r} has {counts.min()}")
    idx = np.arange(len(codes))
    train, test = train_test_split(idx, test_size=test_size, stratify=codes, random_state=seed)
    return np.sort(train), np.sort(test)


def class_split(y, test_size: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a class-disjoint split: a seeded ``test_size`` fraction of the classes (at least 2, leaving at
    least 2) goes wholly to the second part — the metric-learning protocol, where the test classes are never
    seen in training."""
    codes, classes = encode_labels(y)
    if len(classes) < 4:
        raise ValueError(f"a class-disjoint split needs at least 4 classes (2 on each side), got {len(classes)}")
    n_test = min(max(2, int(round(test_size * len(classes)))), len(classes) - 2)
    held = np.random.default_rng(seed).choice(len(classes), size=n_test, replace=False)
    test = np.isin(codes, held)
    return np.flatnonzero(~test), np.flatnonzero(test)


# --- public benchmark datasets (real download code; tests use local copies) ---------------------

# Every download is checked against a pinned SHA-256 before it is used or written where a loader reads it.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # the only official host
FASHION_MNIST_FILES = {  # name -> (official md5, sha256)
    "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                   "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
    "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe",
                                   "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
    "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79",
                                  "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
    "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310",
                                  "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
}
OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
OMNIGLOT_FILES = {  # split -> (name, sha256)
    "background": ("images_background.zip", "34c131e7f2ec78fb457a4de7dfe4c7455c6b7923df1e53e297db20d049c0aa86"),
    "evaluation": ("images_evaluation.zip", "3db3d39e67b1cd9b26980f8f8bf247b6df123357ea7b95c73971dcb4732f1dd4"),
}


def fetch_bytes(url: str, sha256: str, md5: str | None = None) -> bytes:
    """Download ``url`` and return its bytes only if they match the pinned ``sha256`` (and ``md5``)."""
    import hashlib
    import urllib.request

    if not (isinstance(sha256, str) and len(sha256) == 64):
        raise ValueError(f"a download needs a pinned sha256 digest, got {sha256!r} for {url}")
    with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 - fixed official URLs
        data = response.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"download of {url} does not match its pinned sha256 digest (damaged or altered); not used")
    if md5 is not None and hashlib.md5(data).hexdigest() != md5:  # noqa: S324 - published checksum
        raise ValueError(f"download of {url} does not match its published md5; not used")
    return data


def fetch_archive(url: str, md5: str | None = None) -> bytes:
    """Download an archive whose own SHA-256 is not pinned (its host publishes none); only
    :func:`extract_pinned` may use it, which checks every member it writes against a pinned SHA-256."""
    import hashlib
    import urllib.request

    with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 - fixed official URLs
        data = response.read()
    if md5 is not None and hashlib.md5(data).hexdigest() != md5:  # noqa: S324 - published checksum
        raise ValueError(f"download of {url} does not match its published md5; not used")
    return data


def download(url: str, path: Path, sha256: str, md5: str | None = None) -> Path:
    """Fetch ``url`` to ``path`` atomically once it matches the pinned ``sha256`` (and ``md5``)."""
    from metrix.io import atomic_write_bytes

    return atomic_write_bytes(path, fetch_bytes(url, sha256, md5))


def archive_member_name(member: str, prefix: str = "") -> str | None:
    """The plain file name an archive member may be extracted as, or None for folders; a member that
    would land outside the target folder (``..``, an absolute path, a drive, a nested path) raises
    ``ValueError`` (zip-slip)."""
    if member.endswith("/"):
        return None
    if prefix:
        if not member.startswith(prefix):
            raise ValueError(f"archive member {member!r} is outside {prefix!r}; refusing the archive")
        member = member[len(prefix):]
    parts = member.replace("\\", "/").split("/")
    if (member.startswith(("/", "\\")) or ":" in member or len(parts) != 1 or parts[0] in ("", ".", "..")):
        raise ValueError(f"archive member {member!r} would be written outside the data folder; refusing the archive")
    return parts[0]


def extract_pinned(members: dict[str, bytes], root: Path, pinned: dict[str, str]) -> list[Path]:
    """Write the pinned members (name -> bytes) into ``root`` after checking each one's SHA-256; members
    that are not pinned are skipped, pinned ones that are missing or differ raise ``ValueError``."""
    import hashlib

    from metrix.io import atomic_write_bytes

    missing = sorted(set(pinned) - set(members))
    if missing:
        raise ValueError(f"the archive lacks {missing}")
    for name, digest in pinned.items():
        if hashlib.sha256(members[name]).hexdigest() != digest:
            raise ValueError(f"archive member {name} does not match its pinned sha256 digest; nothing extracted")
    return [atomic_write_bytes(root / name, members[name]) for name in sorted(pinned)]


def read_idx(path) -> np.ndarray:
    """Read an IDX file (MNIST format, optionally gzip-compressed) into a uint8 array."""
    import gzip
    import struct

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def load_fashion_mnist(root, split: str = "train", download_missing: bool = False) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017) from the official gzip IDX files in ``root``.

    ``split``: 'train' (60,000) or 'test' (10,000). Images are float32 in [0, 1], shape (n, 1, 28, 28).
    With ``download_missing`` absent files are fetched from the official URL and md5-checked.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    paths = {}
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte.gz"
        paths[kind] = root / name
        if not paths[kind].is_file():
            if not download_missing:
                raise FileNotFoundError(f"{paths[kind]} is missing (fetch it with --download; download_missing=True in Python)")
            md5, sha256 = FASHION_MNIST_FILES[name]
            download(FASHION_MNIST_URL + name, paths[kind], sha256, md5)
    X = read_idx(paths["images-idx3"]).astype(np.float32)[:, None] / 255.0
    y = read_idx(paths["labels-idx1"]).astype(np.int64)
    if len(X) != len(y):
        raise ValueError(f"{root}: {len(X)} images but {len(y)} labels")
    return Dataset(X, y, f"fashion_mnist-{split}", {"image_shape": [28, 28]})


def load_omniglot(root, split: str = "background", image_size: int = 28, download_missing: bool = False) -> Dataset:
    """Omniglot (Lake et al. 2015) from the official zips: one class per (alphabet, character).

    Images are resized to ``image_size`` and inverted so strokes are 1 on a 0 background (the
    MNIST convention), float32 of shape (n, 1, image_size, image_size). Labels are
    ``"<alphabet>/<character>"`` strings.
    """
    import io
    import zipfile

    from PIL import Image

    if split not in OMNIGLOT_FILES:
        raise ValueError(f"split must be one of {sorted(OMNIGLOT_FILES)}, got {split!r}")
    name, sha256 = OMNIGLOT_FILES[split]
    path = Path(root) / name
    if not path.is_file():
        if not download_missing:
            raise FileNotFoundError(f"{path} is missing (fetch it with --download; download_missing=True in Python)")
        download(OMNIGLOT_URL + name, path, sha256)
    images, labels = [], []
    try:
        with zipfile.ZipFile(path) as zf:
            for name in sorted(n for n in zf.namelist() if n.lower().endswith(".png")):
                parts = name.split("/")
                with Image.open(io.BytesIO(zf.read(name))) as im:
                    im = im.convert("L").resize((image_size, image_size), Image.BILINEAR)
                    images.append(1.0 - np.asarray(im, dtype=np.float32) / 255.0)
                labels.append(f"{parts[-3]}/{parts[-2]}")
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path} is not a valid zip file: {exc}") from exc
    if not images:
        raise ValueError(f"{path} holds no PNG images")
    return Dataset(np.stack(images)[:, None], np.asarray(labels), f"omniglot-{split}",
                   {"image_shape": [image_size, image_size]})


# --- text benchmark datasets --------------------------------------------------------------------

@dataclass
class TextDataset:
    """Labelled texts (intent / question-type classification, used for retrieval)."""

    texts: list[str]
    y: np.ndarray  # int64 class indices into ``classes``
    classes: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class SentencePairs:
    """Sentence pairs with a graded similarity (STS: 0 = unrelated … 5 = equivalent)."""

    first: list[str]
    second: list[str]
    scores: np.ndarray  # float64
    name: str

    def __len__(self) -> int:
        return len(self.scores)


STSB_URL = "http://ixa2.si.ehu.eus/stswiki/images/4/48/Stsbenchmark.tar.gz"
STSB_MD5 = "4eb0065aba063ef77873d3a9c8088811"
STSB_FILES = {  # the three CSV files, byte-identical to the official archive's
    "sts-train.csv": "0f71910b59aa1ad973c5897f0791f3b0965a92b8f82b1a95f3eea9f4162fda82",
    "sts-dev.csv": "5d7e944d8b02734b07bfdb5df67db3420c64bed153fcaa1ba47ad03480cf4234",
    "sts-test.csv": "affe45928a66ee5a708531233c95b7dacbbdc57f974f002a3d32ea0180cf816a",
}
BANKING77_URL = "https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/master/banking_data/"
BANKING77_FILES = {  # name -> sha256
    "train.csv": "b06e26ac675513959a63135f11b94ea7786ed02da65db93a5650d8838cbc664b",
    "test.csv": "d12d6e3bc4c3103966ae786dc435913c0c563dfa328f5a3646d0e62cfeeb474d",
    "categories.json": "53261da888122daf2d120d925458631d9619e15d82e56052e7a42e535ce32b63",
}
TREC_URL = "https://cogcomp.seas.upenn.edu/Data/QA/QC/"
TREC_FILES = {  # split -> (name, sha256)
    "train": ("train_5500.label", "9e4c8bdcaffb96ed61041bd64b564183d52793a8e91d84fc3a8646885f466ec3"),
    "test": ("TREC_10.label", "033f22c028c2bbba9ca682f68ffe204dc1aa6e1cf35dd6207f2d4ca67f0d0e8e"),
}


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


def _fetch_stsb(root: Path) -> None:
    """Download the official STS-B archive and extract its three CSV files into ``root`` (each checked
    against its pinned SHA-256; no other member is written)."""
    import io
    import tarfile

    data = fetch_archive(STSB_URL, STSB_MD5)
    members = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and name in STSB_FILES:
                members[name] = tar.extractfile(member).read()
    extract_pinned(members, root, STSB_FILES)


def load_stsb(root, split: str = "test", download_missing: bool = False) -> SentencePairs:
    """STS Benchmark (Cer et al., SemEval 2017) from ``root/sts-{split}.csv`` (tab-separated, no quoting).

    Fields 5–7 of each line are score, sentence 1, sentence 2; some lines carry two extra source fields.
    """
    _check_split(split, ("train", "dev", "test"))
    root = Path(root)
    path = root / f"sts-{split}.csv"
    if not path.is_file():
        if not download_missing:
            raise FileNotFoundError(f"{path} is missing (fetch the official archive with --download; download_missing=True in Python)")
        _fetch_stsb(root)
    first, second, scores = [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 7:
            raise ValueError(f"{path}:{number}: expected at least 7 tab-separated fields, found {len(fields)}")
        scores.append(float(fields[4]))
        first.append(fields[5])
        second.append(fields[6])
    if not scores:
        raise ValueError(f"{path} holds no sentence pairs")
    return SentencePairs(first, second, np.asarray(scores), f"stsb-{split}")


def load_banking77(root, split: str = "train", download_missing: bool = False) -> TextDataset:
    """BANKING77 (Casanueva et al. 2020): customer queries in 77 intents, from the official CSV files.

    Labels are indices into ``categories.json``'s list (mapped by name, never by position in the CSV).
    """
    import json

    _check_split(split, ("train", "test"))
    root = Path(root)
    for name in (f"{split}.csv", "categories.json"):
        if not (root / name).is_file():
            if not download_missing:
                raise FileNotFoundError(f"{root / name} is missing (fetch it with --download; download_missing=True in Python)")
            download(BANKING77_URL + name, root / name, BANKING77_FILES[name])
    classes = json.loads((root / "categories.json").read_text(encoding="utf-8"))
    index = {c: i for i, c in enumerate(classes)}
    texts, y = [], []
    with open(root / f"{split}.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row.get("category") not in index:
                raise ValueError(f"{root / (split + '.csv')}: unknown intent {row.get('category')!r}")
            texts.append(row["text"])
            y.append(index[row["category"]])
    return TextDataset(texts, np.asarray(y, dtype=np.int64), list(classes), f"banking77-{split}")


def load_trec(root, split: str = "train", fine: bool = False, download_missing: bool = False) -> TextDataset:
    """TREC question classification (Li & Roth 2002): 6 coarse or 50 fine question types (Latin-1 files).

    Classes are the label strings seen in the training file, sorted (test-only classes cannot occur: the
    test set's 42 fine types are all in train).
    """
    _check_split(split, ("train", "test"))
    root = Path(root)

    def read(which):
        name, digest = TREC_FILES[which]
        path = root / name
        if not path.is_file():
            if not download_missing:
                raise FileNotFoundError(f"{path} is missing (fetch it with --download; download_missing=True in Python)")
            download(TREC_URL + name, path, digest)
        rows = []
        for number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), 1):
            label, _, text = line.partition(" ")
            if ":" not in label or not text:
                raise ValueError(f"{path}:{number}: expected '<COARSE>:<fine> question', got {line[:40]!r}")
            rows.append((label if fine else label.split(":")[0], text))
        return rows

    train_rows = read("train")
    rows = train_rows if split == "train" else read("test")
    classes = sorted({label for label, _ in train_rows})
    index = {c: i for i, c in enumerate(classes)}
    unknown = {label for label, _ in rows} - set(index)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} of the {split} split are not in the training file")
    return TextDataset([t for _, t in rows], np.asarray([index[lab] for lab, _ in rows], dtype=np.int64), classes,
                       f"trec{'50' if fine else '6'}-{split}")


def load_text_csv(path, text_column: str = "text", label_column: str = "category") -> TextDataset:
    """Labelled texts from a CSV file with a header (BANKING77's layout by default); classes sorted by name."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or text_column not in rows[0] or label_column not in rows[0]:
        raise ValueError(f"{path} needs a header with columns {text_column!r} and {label_column!r} and at least one row")
    classes = sorted({r[label_column] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    return TextDataset([r[text_column] for r in rows], np.asarray([index[r[label_column]] for r in rows], dtype=np.int64),
                       classes, path.stem)


def load_inputs(spec: str, label_column: str = "label"):
    """Raw inputs to embed: a dataset spec (labels kept) or a ``.npy`` array of raw inputs (no labels)."""
    if spec.endswith(".npy"):
        try:
            x = np.load(spec, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {spec} as a NumPy array: {exc}") from exc
        if x.dtype.kind not in "fiu":
            raise ValueError(f"{spec} must hold numbers, got dtype {x.dtype}")
        return x.astype(np.float32), None
    ds = load_dataset(spec, label_column)
    return ds.X, ds.y
