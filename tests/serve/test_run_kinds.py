"""The service on a classical run (metrix fit-linear) and on a text run (metrix text train): Run.open reads
either, and the API embeds raw features or texts with them."""

import numpy as np
import pytest
import torch

from tests.apps.test_text import _toy_corpus, tiny_model_dir  # noqa: F401 - the fixture, shared


def _service(run, tmp_path):
    from metrix.serve.service import Service
    from metrix.serve.store import SQLiteStore

    return Service(run, SQLiteStore(tmp_path / "store"))


def test_a_classical_run_serves_its_learned_mahalanobis_distance(tmp_path, digits):
    from metrix.jobs.classical import fit_linear
    from metrix.runs import Run

    X, y = digits
    fit_linear("NCA", "digits", tmp_path / "nca", n_components=16, params={"max_iter": 20}, echo=lambda *a: None)
    run = Run.open(tmp_path / "nca")
    assert run.kind == "classical" and run.embedding_dim == 16 and run.input_spec.shape == (64,)
    np.testing.assert_allclose(run.embed(X[:5]).numpy(), run.estimator.transform(X[:5].astype(np.float64)), rtol=1e-5,
                               atol=1e-5)
    service = _service(run, tmp_path)
    service.create_collection("d")
    service.upsert("d", [{"id": str(i), "input": X[i].tolist()} for i in range(100)])
    hits = service.search("d", {"input": X[42].tolist()}, k=3)
    L = run.estimator.components_
    d = np.linalg.norm((X[:100].astype(np.float64) - X[42]) @ L.T, axis=1)  # the learned distance itself
    assert [h["id"] for h in hits] == [str(i) for i in np.argsort(d, kind="stable")[:3]]
    np.testing.assert_allclose([h["distance"] for h in hits], np.sort(d)[:3], rtol=1e-4, atol=1e-3)
    service.close()


def test_a_text_run_embeds_texts_through_the_api(tmp_path, tiny_model_dir):  # noqa: F811
    from fastapi.testclient import TestClient

    from metrix.apps.text import SentenceEncoder
    from metrix.runs import Run
    from metrix.serve.app import create_app

    SentenceEncoder.from_pretrained(tiny_model_dir, max_length=16).save(tmp_path / "text-run")
    run = Run.open(tmp_path / "text-run")
    assert run.kind == "text" and run.input_spec is None and run.embedding_dim == 32
    service = _service(run, tmp_path)
    client = TestClient(create_app(service, insecure_no_auth=True), raise_server_exceptions=False)
    texts, _ = _toy_corpus(6, seed=3)
    r = client.post("/v1/embed", json={"inputs": [{"text": t} for t in texts]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["embeddings"], run.encoder.encode(texts), rtol=1e-4, atol=1e-5)
    assert client.post("/v1/collections", json={"name": "t"}).status_code == 201
    client.post("/v1/collections/t/items", json={"items": [{"id": str(i), "text": t} for i, t in enumerate(texts)]})
    hits = client.post("/v1/collections/t/search", json={"query": {"text": texts[2]}, "k": 2}).json()["results"]
    assert hits[0]["id"] == "2" and hits[0]["distance"] < 1e-3
    for body, says in (({"inputs": [{"input": [1.0, 2.0]}]}, "embeds texts"), ({"inputs": [{"text": "  "}]}, "non-empty"),
                       ({"inputs": [{"image": "aGk="}]}, "embeds texts")):
        r = client.post("/v1/embed", json=body)
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    info = client.get("/v1/info").json()
    assert info["kind"] == "text" and info["input_shape"] is None
    service.close()
    assert torch.is_tensor(run.embed(["red cat"]))
    with pytest.raises(ValueError, match="embeds texts"):
        run.embed(np.zeros((2, 3)))


def test_an_onnx_export_is_served_through_onnx_runtime(tmp_path, digits, digits_run):
    """metrix export --format onnx writes the run's shapes, metric and fingerprint into the file: Run.open reads
    it back as an ONNX Runtime model, embeds like the run (1e-5), and the API serves it."""
    pytest.importorskip("onnxruntime")
    from fastapi.testclient import TestClient

    from metrix.io import CorruptFileError
    from metrix.jobs.export import export
    from metrix.runs import Run
    from metrix.serve.app import create_app

    X, _ = digits
    source = Run.open(digits_run)
    export(source, tmp_path / "m.onnx", "onnx")
    run = Run.open(tmp_path / "m.onnx")
    assert (run.kind, run.metric, run.embedding_dim, run.input_spec.shape) == ("onnx", source.metric, 64, (64,))
    assert run.fingerprint == source.fingerprint  # indexes and galleries of the run accept it
    np.testing.assert_allclose(run.embed(X[:50], batch_size=16).numpy(), source.embed(X[:50]).numpy(), atol=1e-5, rtol=0)
    client = TestClient(create_app(_service(run, tmp_path), insecure_no_auth=True), raise_server_exceptions=False)
    r = client.post("/v1/embed", json={"inputs": [{"input": X[i].tolist()} for i in range(3)]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["embeddings"], source.embed(X[:3]).numpy(), atol=1e-5, rtol=0)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(CorruptFileError, match="cannot read"):
        Run.open(tmp_path / "bad.onnx")
