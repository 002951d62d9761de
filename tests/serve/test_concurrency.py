"""16 concurrent clients mixing search, upsert and delete against a real server: no error, every search answer
is consistent (sorted, no duplicate, each distance the true distance to the vector that id holds), and at the
end the index answers exactly as brute force over the store. ``METRIX_SERVE_SECONDS`` sets the duration (60
in the recorded run, RESULTS.md)."""

import http.client
import json
import os
import threading
import time

import numpy as np

from tests.serve.test_web_page import live_server

SECONDS = float(os.environ.get("METRIX_SERVE_SECONDS", "8"))
DIM, CLIENTS = 16, 16


def test_sixteen_clients_mixing_search_upsert_and_delete(make_client):
    client = make_client(with_run=False)
    assert client("POST", "/v1/collections", json={"name": "c", "dim": DIM}).status_code == 201
    vectors: dict[str, np.ndarray] = {}  # every id ever written, with its one vector (ids are never reused)
    lock = threading.Lock()
    seed_rng = np.random.default_rng(0)
    first = [{"id": f"s{i}", "vector": seed_rng.normal(size=DIM).astype(np.float32).tolist()} for i in range(200)]
    client("POST", "/v1/collections/c/items", scope="write", json={"items": first})
    vectors.update({item["id"]: np.float32(item["vector"]) for item in first})
    counts, problems = {"search": 0, "upsert": 0, "delete": 0}, []
    token = client.keys["admin"]
    with live_server(client.asgi) as url:
        host, port = url.split("//")[1].split(":")
        stop = time.monotonic() + SECONDS

        def worker(c):
            rng = np.random.default_rng(100 + c)
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            n = 0
            while time.monotonic() < stop and not problems:
                n += 1
                roll = rng.random()
                if roll < 0.6:
                    q = rng.normal(size=DIM).astype(np.float32)
                    status, body = _post(conn, token, "/v1/collections/c/search", {"query": {"vector": q.tolist()}, "k": 10})
                    if status != 200:
                        problems.append(("search", status, body))
                        continue
                    hits = body["results"]
                    ids = [h["id"] for h in hits]
                    dist = [h["distance"] for h in hits]
                    if len(set(ids)) != len(ids) or dist != sorted(dist):
                        problems.append(("unsorted or duplicate", hits))
                    for h in hits:
                        with lock:
                            v = vectors.get(h["id"])
                        true = float(np.linalg.norm(v.astype(np.float64) - q)) if v is not None else None
                        if true is None or abs(true - h["distance"]) > 1e-3 * (1 + true):
                            problems.append(("distance", h, true))
                    counts["search"] += 1
                elif roll < 0.85:
                    items = [{"id": f"w{c}-{n}-{j}", "vector": rng.normal(size=DIM).astype(np.float32).tolist()} for j in range(4)]
                    with lock:
                        vectors.update({item["id"]: np.float32(item["vector"]) for item in items})
                    status, body = _post(conn, token, "/v1/collections/c/items", {"items": items})
                    if status != 200:
                        problems.append(("upsert", status, body))
                    counts["upsert"] += 1
                else:
                    with lock:
                        victims = list(rng.choice(list(vectors), size=3, replace=False))
                    status, body = _post(conn, token, "/v1/collections/c/delete", {"ids": victims})
                    if status != 200:
                        problems.append(("delete", status, body))
                    counts["delete"] += 1

        threads = [threading.Thread(target=worker, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not problems, problems[:5]
    assert min(counts.values()) > 0
    # the end state: the index answers as brute force over the store
    stored = {r.item_id: r.vector for r in client.service.store.items("c", DIM)}
    ids = list(stored)
    matrix = np.stack([stored[i] for i in ids]).astype(np.float64)
    for q in np.random.default_rng(7).normal(size=(10, DIM)).astype(np.float32):
        hits = client("POST", "/v1/collections/c/search", scope="read", json={"query": {"vector": q.tolist()}, "k": 10}).json()
        d = np.linalg.norm(matrix - q, axis=1)
        assert [h["id"] for h in hits["results"]] == [ids[i] for i in np.argsort(d, kind="stable")[:10]]
    assert client("GET", "/v1/collections/c/count", scope="read").json()["count"] == len(stored)
    print(f"\n{CLIENTS} clients, {SECONDS:g} s: {counts['search']} searches, {counts['upsert']} upserts, "
          f"{counts['delete']} deletes, no error")


def _post(conn, token, path, body):
    conn.request("POST", path, body=json.dumps(body),
                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())
