"""Every file kind metrix writes, attacked as a bad disk, a bad copy or an editor would: truncated, bytes
flipped, resized, its header edited. Each must fail with ``CorruptFileError`` (never a KeyError, a
TypeError or a silently changed result), and a header forged with a valid checksum must be refused by the
field checks before anything large is allocated."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from metrix.io import CorruptFileError, load_tensors, save_tensors

KEY = b"a secret key of 32 bytes, really"


def _model_run(folder):
    from metrix.models import EmbeddingModel, save_model
    save_model(EmbeddingModel("mlp", 8, input_shape=(12,), backbone_kwargs={"hidden_dims": (16,)}), folder, {"x": 1})
    return folder / "model.safetensors"


def _gallery(path):
    from metrix.apps.verification import Gallery
    g = Gallery(threshold=0.7)
    g.enroll("alice", np.random.default_rng(0).normal(size=(3, 8)))
    g.enroll("bob", np.random.default_rng(1).normal(size=(2, 8)))
    g.save(path)
    return path


def _index(path, faiss_index=None):
    from metrix.index import VectorIndex
    if faiss_index is None:
        idx = VectorIndex(8)
    else:
        pytest.importorskip("faiss")
        idx = VectorIndex(8, backend="faiss", faiss_index=faiss_index, nprobe=2)
    idx.add(np.random.default_rng(0).normal(size=(200, 8)), metadata=[{"i": i} for i in range(200)])
    idx.search(np.zeros((1, 8)), k=1)  # builds the faiss structure, so it is saved
    idx.save(path)
    return path


def _estimator(path):
    from metrix.classical import LMNN, save_estimator
    X = np.random.default_rng(0).normal(size=(60, 4))
    save_estimator(LMNN(n_neighbors=2, max_iter=5).fit(X, np.arange(60) % 3), path)
    return path


def _recommender(path):
    from metrix.apps.recommend import CML, save_recommender
    save_recommender(CML(5, 7, dim=4), path)
    return path


def _fewshot(path):
    from metrix.apps.fewshot import PrototypicalNetwork
    PrototypicalNetwork(input_shape=(1, 12, 12)).save(path)
    return path


def _checkpoint(path):
    from metrix.losses import TripletMarginLoss
    from metrix.models import EmbeddingModel
    from metrix.training import Trainer
    x, y = torch.randn(40, 6), torch.arange(4).repeat(10)
    Trainer(EmbeddingModel("mlp", 4, input_shape=(6,), backbone_kwargs={"hidden_dims": (8,)}), TripletMarginLoss(),
            epochs=1, checkpoint_dir=path.parent, progress=False, classes_per_batch=4, samples_per_class=5).fit(x, y)
    return path.parent / "last.safetensors"


def _load_checkpoint(path):
    from metrix.losses import TripletMarginLoss
    from metrix.models import EmbeddingModel
    from metrix.training import Trainer
    Trainer(EmbeddingModel("mlp", 4, input_shape=(6,), backbone_kwargs={"hidden_dims": (8,)}), TripletMarginLoss(),
            epochs=1, checkpoint_dir=path.parent, progress=False)._load_last()


def _loaders():
    from metrix.apps.fewshot import PrototypicalNetwork
    from metrix.apps.recommend import load_recommender
    from metrix.apps.verification import Gallery
    from metrix.classical import load_estimator
    from metrix.index import VectorIndex
    from metrix.models import load_model
    return {
        "run": (lambda d: _model_run(d), lambda p: load_model(p.parent)),
        "gallery": (lambda d: _gallery(d / "g.gallery"), Gallery.load),
        "index": (lambda d: _index(d / "i.idx"), VectorIndex.load),
        "index-ivf": (lambda d: _index(d / "i.idx", "IVF4,Flat"), VectorIndex.load),
        "estimator": (lambda d: _estimator(d / "e.safetensors"), load_estimator),
        "recommender": (lambda d: _recommender(d / "r.safetensors"), load_recommender),
        "fewshot": (lambda d: _fewshot(d / "f.safetensors"), PrototypicalNetwork.load),
        "checkpoint": (lambda d: _checkpoint(d / "last.safetensors"), _load_checkpoint),
    }


KINDS = ["run", "gallery", "index", "index-ivf", "estimator", "recommender", "fewshot", "checkpoint"]


def _damaged(original: bytes):
    """(what, bytes) for truncations, flips across header and data, resizes and in-place header edits."""
    n = len(original)
    header_end = 8 + int.from_bytes(original[:8], "little")
    for cut in sorted({0, 3, 8, 9, header_end // 2, header_end - 1, header_end, header_end + 1, (header_end + n) // 2, n - 1}):
        yield f"truncated at {cut}", original[:cut]
    for pos in sorted(set(np.linspace(0, n - 1, 48).astype(int).tolist()) | {0, 7, header_end - 2, header_end}):
        data = bytearray(original)
        data[pos] ^= 0x5A
        yield f"byte {pos} flipped", bytes(data)
    yield "one byte appended", original + b"\0"
    yield "1 KB appended", original + bytes(1024)
    yield "header length inflated", (header_end - 8 + 8).to_bytes(8, "little") + original[8:]
    text = original[8:header_end].decode()
    for old, new in (("0.7", "0.9"), ('"alice"', '"mallo"'), ("euclidean", "cosine"), ('"nprobe\\": 2', '"nprobe\\": 9'),
                     ('"shape":[', '"shape":[1,'), ("F32", "F64"), ("n_items\\\": 7", "n_items\\\": 9")):
        if old in text:
            edited = text.replace(old, new, 1)
            edited += " " * (len(text) - len(edited)) if len(edited) <= len(text) else ""
            yield f"header edit {old} -> {new}", len(edited).to_bytes(8, "little") + edited.encode() + original[header_end:]


@pytest.mark.parametrize("kind", KINDS)
def test_every_damaged_file_raises_corrupt_file_error(kind, tmp_path):
    make, load = _loaders()[kind]
    path = make(tmp_path)
    load(path)  # the intact file loads
    original = path.read_bytes()
    outcomes = []
    for what, data in _damaged(original):
        path.write_bytes(data)
        try:
            load(path)
            outcomes.append(f"{what}: loaded")
        except CorruptFileError:
            pass
        except Exception as exc:  # noqa: BLE001  anything else is a defect: a traceback for the user
            outcomes.append(f"{what}: {type(exc).__name__}: {exc}")
    assert not outcomes, outcomes
    path.write_bytes(original)
    load(path)


def _forge(path, edit):
    """Re-save with an edited header and a *valid* checksum: what someone with metrix in hand can do."""
    tensors, meta = load_tensors(path)
    tensors = {k: v.clone() for k, v in tensors.items()}
    edit(tensors, meta)
    save_tensors(path, tensors, meta)


def _edit_json(key, change):
    def edit(tensors, meta):
        info = json.loads(meta[key])
        change(info)
        meta[key] = json.dumps(info)
    return edit


FORGERIES = [
    ("gallery", _edit_json("metrix_gallery", lambda i: i.update(threshold="inf")), "threshold"),
    ("gallery", _edit_json("metrix_gallery", lambda i: i.update(identities=["alice", "alice"])), "distinct"),
    ("gallery", _edit_json("metrix_gallery", lambda i: i.update(identities=["alice"])), "do not match"),
    ("gallery", _edit_json("metrix_gallery", lambda i: i.update(provenance=["run", 5])), "provenance"),
    ("index", lambda t, m: m.update(provenance='{"run": 5}'), "provenance"),
    ("index", _edit_json("config", lambda c: c.update(dim=9)), "dimension"),
    ("index", _edit_json("config", lambda c: c.update(nprobe=-1)), "nprobe"),
    ("index", _edit_json("config", lambda c: c.update(metric=["euclidean"])), "vector index"),
    ("index", lambda t, m: m.update(config="[" * 100_000), "vector index"),
    ("estimator", _edit_json("metrix_classical", lambda h: h.update(fitted={"n_features_in_": 99})), "n_features_in_"),
    ("estimator", _edit_json("metrix_classical", lambda h: h["params"].update(no_such_param=1)), "estimator"),
    ("recommender", _edit_json("metrix_recommender", lambda i: i["model"].update(n_items=300_000_000)), "do not fit"),
    ("fewshot", _edit_json("metrix_fewshot", lambda i: i.update(input_shape=[1, 60000, 60000])), "input_shape"),
    ("run", _edit_json("metrix_run_config", lambda c: c["model"].update(embedding_dim=10**9)), "do not fit"),
    ("run", _edit_json("metrix_run_config", lambda c: c["model"].update(input_shape=[1, 60000, 60000])), "input_shape"),
]


@pytest.mark.parametrize("kind,edit,message", FORGERIES)
def test_forged_headers_are_refused_by_their_field_checks(kind, edit, message, tmp_path):
    make, load = _loaders()[kind]
    path = make(tmp_path)
    _forge(path, edit)
    with pytest.raises(CorruptFileError, match=message):
        load(path)


def test_forged_sizes_fail_before_any_large_allocation(tmp_path):
    """Peak memory of a fresh process that loads forged headers asking for gigabytes (3e8 items; a 60000²
    input; a 10⁹-d embedding) stays within a few MB of what loading the intact files costs."""
    files = {}
    for kind, edit, _ in [f for f in FORGERIES if f[0] in ("recommender", "fewshot", "run")]:
        folder = tmp_path / f"{kind}-{len(files)}"
        folder.mkdir()
        path = _loaders()[kind][0](folder)
        _forge(path, edit)
        files[str(path)] = kind
    script = textwrap.dedent("""
        import json, resource, sys
        from metrix.io import CorruptFileError
        from metrix.apps.recommend import load_recommender
        from metrix.apps.fewshot import PrototypicalNetwork
        from metrix.models import load_model
        from pathlib import Path
        loaders = {"recommender": load_recommender, "fewshot": PrototypicalNetwork.load,
                    "run": lambda p: load_model(Path(p).parent)}
        growth = {}
        for path, kind in json.loads(sys.argv[1]).items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            try:
                loaders[kind](path)
                growth[path] = "loaded"
            except CorruptFileError:
                growth[path] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps(growth))
    """)
    out = subprocess.run([sys.executable, "-c", script, json.dumps(files)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(g != "loaded" and g < 50_000 for g in growth.values()), growth  # KB: under 50 MB each


@pytest.mark.parametrize("kind", ["gallery", "index"])
def test_signed_files_need_their_key(kind, tmp_path):
    from metrix.apps.verification import Gallery
    from metrix.index import VectorIndex

    cls = Gallery if kind == "gallery" else VectorIndex
    path = _loaders()[kind][0](tmp_path)
    obj = cls.load(path)
    obj.save(path, key=KEY)
    cls.load(path, key=KEY)
    with pytest.raises(CorruptFileError, match="signed"):
        cls.load(path)  # no key: refused, not read unverified
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        cls.load(path, key=b"another key of at least 16 bytes")
    _forge_signed_without_key = lambda: obj.save(path)  # noqa: E731  what a forger without the key can write
    _forge_signed_without_key()
    with pytest.raises(CorruptFileError, match="not signed"):
        cls.load(path, key=KEY)


def test_faiss_flat_structure_must_hold_the_stored_vectors(tmp_path):
    faiss = pytest.importorskip("faiss")
    from metrix.index import VectorIndex

    path = _index(tmp_path / "i.idx", "Flat")

    def swap(tensors, meta):  # a structure over other vectors, consistent in size, dimension and metric
        other = faiss.IndexFlatL2(8)
        other.add(np.random.default_rng(5).normal(size=(200, 8)).astype(np.float32))
        tensors["faiss"] = torch.from_numpy(faiss.serialize_index(other))
    _forge(path, swap)
    with pytest.raises(CorruptFileError, match="differ from the stored"):
        VectorIndex.load(path)
