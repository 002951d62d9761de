"""The HTTP API over a real run and a real SQLite store: keys and scopes, collections and items, search,
verification, embeddings, limits, clear 4xx errors for bad input (with the store unchanged), and restarts."""

import base64
import io
import json
import threading

import numpy as np
import pytest
import torch

from tests.conftest import run_threads


def _inputs(x):
    return [{"input": row.tolist()} for row in x]


def _collection_with_digits(client, digits, name="digits", n=200, index_type="exact"):
    X, y = digits
    assert client("POST", "/v1/collections", json={"name": name, "index_type": index_type}).status_code == 201
    items = [{"id": f"d{i}", "input": X[i].tolist(), "label": str(y[i]), "metadata": {"digit": int(y[i]), "odd": bool(y[i] % 2)}}
             for i in range(n)]
    for start in range(0, n, 100):
        r = client("POST", f"/v1/collections/{name}/items", scope="write", json={"items": items[start : start + 100]})
        assert r.status_code == 200, r.text


def test_every_route_but_health_needs_a_key_with_the_right_scope(make_client):
    client = make_client()
    assert client("GET", "/healthz", scope=None).status_code == 200
    assert client("GET", "/readyz", scope=None).json()["status"] == "ready"
    assert client("GET", "/", scope=None).status_code == 200  # the page itself; its calls need a key
    for method, path in (("GET", "/v1/collections"), ("GET", "/metrics"), ("POST", "/v1/embed"),
                         ("POST", "/v1/collections"), ("GET", "/v1/audit")):
        r = client(method, path, scope=None, json={})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"], (path, r.text)
        bad = client(method, path, scope=None, json={}, headers={"Authorization": "Bearer mxk_nope_nope"})
        assert bad.status_code == 401
    r = client("POST", "/v1/collections", scope="write", json={"name": "c"})
    assert r.status_code == 403 and "'admin' scope" in r.json()["error"]["message"]
    assert client("POST", "/v1/collections", scope="admin", json={"name": "c"}).status_code == 201
    r = client("POST", "/v1/collections/c/items", scope="read", json={"items": [{"vector": [0.0] * 64}]})
    assert r.status_code == 403
    assert client("GET", "/v1/collections", scope="read").status_code == 200
    # revoked keys stop working at once
    key_id = client.keys["read"].split("_")[1]
    assert client.service.store.revoke_key(key_id)
    assert client("GET", "/v1/collections", scope="read").status_code == 401


def test_upsert_search_get_delete_with_filters_radius_and_counts(make_client, digits):
    X, y = digits
    client = make_client()
    _collection_with_digits(client, digits)
    assert client("GET", "/v1/collections/digits/count", scope="read").json() == {"count": 200}
    r = client("POST", "/v1/collections/digits/search", scope="read", json={"query": {"input": X[7].tolist()}, "k": 5})
    hits = r.json()["results"]
    assert hits[0]["id"] == "d7" and hits[0]["distance"] < 1e-3 and hits[0]["metadata"] == {"digit": int(y[7]), "odd": bool(y[7] % 2)}
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    # the same answer as exact search over the run's embeddings
    emb = client.service.run.embed(X[:200]).numpy()
    d = np.linalg.norm(emb - emb[7], axis=1)
    assert [h["id"] for h in hits] == [f"d{i}" for i in np.argsort(d, kind="stable")[:5]]
    # metadata filter: only odd digits, exact even when few match
    r = client("POST", "/v1/collections/digits/search", scope="read",
               json={"query": {"input": X[7].tolist()}, "k": 10, "filter": {"odd": True}})
    assert all(h["metadata"]["odd"] for h in r.json()["results"]) and len(r.json()["results"]) == 10
    r = client("POST", "/v1/collections/digits/search", scope="read",
               json={"query": {"input": X[7].tolist()}, "k": 50, "radius": 0.5})
    assert all(h["distance"] <= 0.5 for h in r.json()["results"])
    # precomputed vectors are accepted too
    r = client("POST", "/v1/collections/digits/search", scope="read", json={"query": {"vector": emb[3].tolist()}, "k": 1})
    assert r.json()["results"][0]["id"] == "d3"
    got = client("GET", "/v1/collections/digits/items/d3", scope="read").json()
    np.testing.assert_allclose(got["vector"], emb[3], rtol=1e-5, atol=1e-6)
    # upsert replaces by id; delete removes; counts follow
    r = client("POST", "/v1/collections/digits/items", scope="write",
               json={"items": [{"id": "d3", "input": X[500].tolist(), "metadata": {"new": 1}}]})
    assert r.json()["replaced"] == 1
    assert client("GET", "/v1/collections/digits/items/d3", scope="read").json()["metadata"] == {"new": 1}
    assert client("DELETE", "/v1/collections/digits/items/d3", scope="write").json() == {"deleted": 1}
    assert client("GET", "/v1/collections/digits/items/d3", scope="read").status_code == 404
    assert client("POST", "/v1/collections/digits/delete", scope="write", json={"ids": ["d4", "d5", "zz"]}).json() == {"deleted": 2}
    assert client("GET", "/v1/collections/digits/count", scope="read").json() == {"count": 197}
    assert client("DELETE", "/v1/collections/digits").status_code == 200
    assert client("GET", "/v1/collections/digits/count", scope="read").status_code == 404
    actions = [e["action"] for e in client("GET", "/v1/audit").json()["entries"]]
    assert {"create_collection", "upsert", "delete", "delete_collection"} <= set(actions)


def test_embed_matches_the_run_and_micro_batches_concurrent_requests(make_client, digits):
    X, _ = digits
    client = make_client(batching=(64, 0.05, 256))
    r = client("POST", "/v1/embed", scope="read", json={"inputs": _inputs(X[:3])})
    assert r.status_code == 200 and r.json()["dim"] == 64
    np.testing.assert_allclose(r.json()["embeddings"], client.service.run.embed(X[:3]).numpy(), rtol=1e-5, atol=1e-6)
    results = {}

    def call(i):
        results[i] = client("POST", "/v1/embed", scope="read", json={"inputs": _inputs(X[i : i + 1])}).json()

    assert run_threads(call, 16) == []
    want = client.service.run.embed(X[:16]).numpy()
    for i in range(16):
        np.testing.assert_allclose(results[i]["embeddings"][0], want[i], rtol=1e-5, atol=1e-5)
    metrics = client("GET", "/metrics", scope="read").text
    counts = {line.split("{")[0] + line.split('le="')[1].split('"')[0]: float(line.split()[-1])
              for line in metrics.splitlines() if line.startswith("metrix_embed_batch_size_bucket")}
    calls = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("metrix_embed_batch_size_count")))
    assert calls < 17  # 17 requests (1 + 16 concurrent) took fewer model calls: some shared a batch
    assert counts["metrix_embed_batch_size_bucket+Inf"] == calls
    assert 'metrix_requests_total{method="POST",route="/v1/embed",status="200"} 17' in metrics
    assert "metrix_request_seconds_bucket" in metrics and "metrix_embed_queue" in metrics


def test_gallery_enroll_calibrate_verify_and_open_set_identify(make_client, digits):
    X, y = digits
    client = make_client()
    assert client("POST", "/v1/galleries", json={"name": "people"}).status_code == 201
    # identities 0-4 enrolled (20 samples each); 5-9 are strangers
    for digit in range(5):
        idx = np.flatnonzero(y == digit)[:20]
        r = client("POST", "/v1/galleries/people/enroll", scope="write",
                   json={"identity": str(digit), "samples": _inputs(X[idx])})
        assert r.json() == {"identity": str(digit), "added": 20, "skipped": 0}
    again = client("POST", "/v1/galleries/people/enroll", scope="write",
                   json={"identity": "0", "samples": _inputs(X[np.flatnonzero(y == 0)[:20]])})
    assert again.json()["skipped"] == 20  # the same samples again: already held, not weighed twice
    r = client("POST", "/v1/galleries/people/verify", scope="read", json={"identity": "0", "probe": {"input": X[0].tolist()}})
    assert r.status_code == 409 and "calibrate" in r.json()["error"]["message"]  # no threshold: no silent answer
    held_out = [i for d in range(10) for i in np.flatnonzero(y == d)[40:52]]
    cal = client("POST", "/v1/galleries/people/calibrate",
                 json={"samples": [{"input": X[i].tolist(), "label": str(y[i])} for i in held_out], "target_far": 0.01})
    assert cal.status_code == 200, cal.text
    body = cal.json()
    assert body["calibration"]["pairs"] == len(held_out) * (len(held_out) - 1) // 2 and len(body["calibration"]["roc"]["far"]) <= 101
    probe = np.flatnonzero(y == 3)[30]
    r = client("POST", "/v1/galleries/people/verify", scope="read", json={"identity": "3", "probe": {"input": X[probe].tolist()}})
    assert r.json()["accepted"] is True and r.json()["distance"] <= body["threshold"]
    r = client("POST", "/v1/galleries/people/verify", scope="read", json={"identity": "1", "probe": {"input": X[probe].tolist()}})
    assert r.json()["accepted"] is False
    known = client("POST", "/v1/galleries/people/identify", scope="read", json={"probe": {"input": X[probe].tolist()}, "k": 3})
    assert known.json()["identity"] == "3" and len(known.json()["candidates"]) == 3
    strangers = [np.flatnonzero(y == d)[30] for d in range(5, 10)]
    answers = [client("POST", "/v1/galleries/people/identify", scope="read",
                      json={"probe": {"input": X[i].tolist()}}).json()["identity"] for i in strangers]
    assert answers.count("unknown") >= 3  # open set: most strangers are not forced onto a known identity
    assert client("GET", "/v1/galleries/people/identities", scope="read").json()["identities"] == [str(d) for d in range(5)]
    assert client("DELETE", "/v1/galleries/people/identities/4", scope="write").json()["removed"] == 20


def _png(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_bad_input_gets_a_clear_4xx_and_never_changes_the_store(make_client, digits):
    X, _ = digits
    client = make_client()
    _collection_with_digits(client, digits, n=20)
    before = client.service.store.items("digits", 64)
    nan_body = '{"items": [{"id": "x", "vector": [NaN' + ", 0.0" * 63 + "]}]}"
    cases = [
        ("POST", "/v1/collections/digits/items", {"items": [{"id": "x", "vector": [0.0] * 3}]}, 400, "64-d"),
        ("POST", "/v1/collections/digits/items", {"items": [{"id": "x", "input": [1.0] * 5}]}, 400, "takes 64"),
        ("POST", "/v1/collections/digits/items", {"items": [{"id": "x", "image": "not base64!"}]}, 400, "base64"),
        ("POST", "/v1/collections/digits/items", {"items": [{"id": "x", "image": base64.b64encode(b"GIF89a-junk").decode()}]}, 400, "cannot read the image"),
        ("POST", "/v1/collections/digits/items", {"items": [{"id": "x", "input": X[0].tolist()}, {"id": "x", "input": X[1].tolist()}]}, 400, "twice"),
        ("POST", "/v1/collections/digits/items", {"items": []}, 400, "at least one"),
        ("POST", "/v1/collections/digits/items", {"items": [{"id": "x", "input": X[0].tolist()}, {"id": "y", "vector": [1.0]}]}, 400, "item 1"),
        ("POST", "/v1/collections/digits/items", {"itemz": []}, 422, "items"),
        ("POST", "/v1/collections/nope/items", {"items": [{"vector": [0.0] * 64}]}, 404, "no collection named 'nope'"),
        ("POST", "/v1/collections/digits/search", {"query": {"input": X[0].tolist()}, "k": 0}, 400, "k must be"),
        ("POST", "/v1/collections/digits/search", {"query": {"input": X[0].tolist()}, "k": 10**9}, 400, "k must be"),
        ("POST", "/v1/collections/digits/search", {"query": {}, "k": 1}, 400, "neither"),
        ("POST", "/v1/collections", {"name": "digits"}, 409, "exists"),
        ("POST", "/v1/collections", {"name": "../etc"}, 400, "invalid name"),
        ("POST", "/v1/collections", {"name": "x", "metric": "l2"}, 400, "unknown metric 'l2'"),
        ("POST", "/v1/collections", {"name": "x", "index_type": "faiss:Nope"}, 400, "index_type"),
        ("POST", "/v1/galleries/digits/verify", {"identity": "a", "probe": {"input": X[0].tolist()}}, 404, "no gallery"),
    ]
    for method, path, body, status, says in cases:
        r = client(method, path, json=body)
        assert r.status_code == status and says in r.json()["error"]["message"], (path, body if len(str(body)) < 200 else "", r.text)
    r = client("POST", "/v1/collections/digits/items", content=nan_body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "NaN" in r.json()["error"]["message"]
    big = client("POST", "/v1/collections/digits/items", content=b"{" + b" " * (9 * 2**20) + b"}",
                 headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "larger than" in big.json()["error"]["message"]
    after = client.service.store.items("digits", 64)
    assert [(r.item_id, r.vector.tobytes()) for r in after] == [(r.item_id, r.vector.tobytes()) for r in before]
    # an image the run can take is embedded like its pixels (grey, scaled to [0, 1], resized to the input)
    pixels = np.kron(np.arange(64).reshape(8, 8) * 4, np.ones((3, 3)))
    r = client("POST", "/v1/embed", scope="read", json={"inputs": [{"image": _png(pixels)}]})
    want = client.service.run.embed(torch.from_numpy((np.arange(64) * 4 / 255.0).astype(np.float32)[None])).numpy()
    np.testing.assert_allclose(r.json()["embeddings"][0], want[0], atol=0.05)


def test_a_restarted_service_rebuilds_every_index_from_the_store(make_client, digits, tmp_path):
    X, y = digits
    first = make_client(tmp_path / "s")
    _collection_with_digits(first, digits, n=120, index_type="faiss:Flat")
    first("POST", "/v1/galleries", json={"name": "g"})
    first("POST", "/v1/galleries/g/enroll", scope="write", json={"identity": "a", "samples": _inputs(X[:3])})
    first("POST", "/v1/collections/digits/delete", scope="write", json={"ids": ["d1"]})
    query = {"query": {"input": X[9].tolist()}, "k": 7}
    want = first("POST", "/v1/collections/digits/search", scope="read", json=query).json()
    second = make_client(tmp_path / "s")
    got = second("POST", "/v1/collections/digits/search", scope="read", json=query).json()
    assert got == want
    listed = {c["name"]: c for c in second("GET", "/v1/collections", scope="read").json()["collections"]}
    assert listed["digits"]["count"] == 119 and listed["digits"]["index_type"] == "faiss:Flat" and listed["g"]["count"] == 3


def test_vector_only_service_and_openapi(make_client):
    client = make_client(with_run=False)
    r = client("POST", "/v1/collections", json={"name": "v"})
    assert r.status_code == 400 and "give dim" in r.json()["error"]["message"]
    assert client("POST", "/v1/collections", json={"name": "v", "dim": 3, "metric": "cosine"}).status_code == 201
    client("POST", "/v1/collections/v/items", scope="write", json={"items": [{"id": "a", "vector": [1, 0, 0]},
                                                                             {"id": "b", "vector": [0, 1, 0]}]})
    hits = client("POST", "/v1/collections/v/search", scope="read", json={"query": {"vector": [1, 0.1, 0]}, "k": 2}).json()
    assert [h["id"] for h in hits["results"]] == ["a", "b"]
    r = client("POST", "/v1/embed", scope="read", json={"inputs": [{"input": [1.0]}]})
    assert r.status_code == 400 and "without a run" in r.json()["error"]["message"]
    schema = client("GET", "/openapi.json", scope=None).json()
    assert "/v1/collections/{name}/search" in schema["paths"] and schema["info"]["version"] == "v1"


def test_batcher_refuses_work_beyond_its_queue_with_429(digits_run):
    from metrix.serve.batching import MicroBatcher, Saturated

    gate = threading.Event()
    batcher = MicroBatcher(lambda x: (gate.wait(10), x)[1], max_batch=1, max_delay=0, max_queue=1)
    first = batcher.submit(np.zeros((1, 2)))  # taken by the worker, which blocks on the gate
    import time

    time.sleep(0.1)
    second = batcher.submit(np.ones((1, 2)))  # waits in the queue
    with pytest.raises(Saturated):
        batcher.submit(np.ones((1, 2)))
    gate.set()
    assert first.result(5).tolist() == [[0, 0]] and second.result(5).tolist() == [[1, 1]]
    batcher.close()


def test_cli_keys_and_serve_refuses_insecure_on_a_public_address(tmp_path):
    from typer.testing import CliRunner

    from metrix.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["serve", "keys", "create", "--store", str(tmp_path), "--scope", "read", "--scope", "write"])
    assert r.exit_code == 0 and r.output.startswith("mxk_")
    listed = json.loads(runner.invoke(app, ["serve", "keys", "list", "--store", str(tmp_path), "--json"]).output)
    assert listed[0]["scopes"] == ["read", "write"] and "secret" not in json.dumps(listed)
    assert r.output.strip().split("_", 2)[2] not in (tmp_path / "metrix.db").read_bytes().decode("latin-1")
    r = runner.invoke(app, ["serve", "--store", str(tmp_path), "--host", "0.0.0.0", "--insecure-no-auth"])
    assert r.exit_code == 2 and "loopback" in r.output
    r = runner.invoke(app, ["serve", "keys", "revoke", "nope", "--store", str(tmp_path)])
    assert r.exit_code == 2 and "no active key" in r.output
