"""Several services on one store: each follows the store's change feed, so what one acknowledges becomes
visible in searches on the others. SQLite (two services, one folder) always runs; PostgreSQL runs two real
``metrix serve`` processes against a real server (``$METRIX_TEST_POSTGRES``, or a local server that accepts
``postgresql://metrix:metrix@127.0.0.1:5432/metrix_test``; skipped with a message where none answers)."""

import json
import os
import secrets
import signal
import statistics
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

DIM = 8


def _services(store_a, store_b):
    from metrix.serve.service import Service

    return Service(None, store_a), Service(None, store_b)


def _wait_visible(service, name, vector, item_id, timeout=10.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        service.sync()
        try:
            hits = service.search(name, {"vector": vector}, k=1)
        except KeyError:
            hits = []
        if hits and hits[0]["id"] == item_id:
            return time.perf_counter() - start
        time.sleep(0.002)
    raise AssertionError(f"{item_id} not visible after {timeout} s")


def test_two_services_on_one_sqlite_store_see_each_others_writes(tmp_path):
    from metrix.serve.store import SQLiteStore

    a, b = _services(SQLiteStore(tmp_path), SQLiteStore(tmp_path))
    rng = np.random.default_rng(0)
    a.create_collection("c", dim=DIM)
    b.create_collection("g", kind="gallery", dim=DIM)
    b.sync()
    a.sync()
    for i in range(20):
        v = rng.normal(size=DIM).tolist()
        (a if i % 2 else b).upsert("c", [{"id": f"x{i}", "vector": v, "metadata": {"i": i}}])
        _wait_visible(b if i % 2 else a, "c", v, f"x{i}")
    a.delete_items("c", ["x3"])
    b.sync()
    assert b.count("c") == a.count("c") == 19
    b.upsert("c", [{"id": "x4", "vector": [9.0] * DIM}])  # a replacement made on b ...
    a.sync()
    assert a.get_item("c", "x4")["vector"] == [9.0] * DIM and a.count("c") == 19  # ... replaces on a too
    b.enroll("g", "ann", [{"vector": rng.normal(size=DIM).tolist()}])
    a.sync()
    assert a.identities("g") == ["ann"]
    b.calibrate("g", [{"vector": rng.normal(size=DIM).tolist(), "label": str(i % 2)} for i in range(6)])
    a.sync()
    assert a.collection("g")["threshold"] == b.collection("g")["threshold"] is not None
    b.remove_identity("g", "ann")
    b.delete_collection("c")
    a.sync()
    assert a.identities("g") == [] and [c["name"] for c in a.collections()] == ["g"]
    a.close()
    b.close()


# ------------------------------------------------------------------ PostgreSQL, two real replicas
def _postgres_url():
    url = os.environ.get("METRIX_TEST_POSTGRES", "postgresql://metrix:metrix@127.0.0.1:5432/metrix_test")
    psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL store needs psycopg")
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server answers at {url.split('@')[-1]} ({str(exc).splitlines()[0]}); "
                    ".ci/run starts one")
    return url, psycopg


@pytest.fixture
def postgres_db():
    """A fresh database on the server, dropped afterwards."""
    url, psycopg = _postgres_url()
    name = f"metrix_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _call(port, method, path, token, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_two_replicas_on_postgresql_share_writes_within_a_measured_lag(postgres_db):
    from metrix.serve.keys import create_key
    from metrix.serve.store import PostgresStore
    from tests.serve.test_crash import _free_port, _start_args, _wait_ready

    token = create_key(PostgresStore(postgres_db), ["admin"])
    ports = [_free_port(), _free_port()]
    procs = [subprocess.Popen(_start_args(postgres_db, port, "--follow-interval", "0.02"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for port in ports]
    try:
        for proc, port in zip(procs, ports):
            _wait_ready(proc, port)
        _call(ports[0], "POST", "/v1/collections", token, {"name": "c", "dim": DIM})
        rng, lags = np.random.default_rng(1), []
        for i in range(30):
            writer, reader = (ports[0], ports[1]) if i % 2 == 0 else (ports[1], ports[0])
            v = rng.normal(size=DIM).tolist()
            _call(writer, "POST", "/v1/collections/c/items", token, {"items": [{"id": f"x{i}", "vector": v}]})
            acked = time.perf_counter()
            while True:
                try:
                    hits = _call(reader, "POST", "/v1/collections/c/search", token, {"query": {"vector": v}, "k": 1})
                except urllib.error.HTTPError:  # the collection itself has not reached this replica yet
                    hits = {"results": []}
                if hits["results"] and hits["results"][0]["id"] == f"x{i}":
                    lags.append(time.perf_counter() - acked)
                    break
                assert time.perf_counter() - acked < 10, f"x{i} never reached the other replica"
        counts = [_call(p, "GET", "/v1/collections/c/count", token)["count"] for p in ports]
        assert counts == [30, 30]
        actions = [e["action"] for e in _call(ports[1], "GET", "/v1/audit?limit=100", token)["entries"]]
        assert actions.count("upsert") == 30 and actions[-1] == "create_collection"  # newest first, from either replica
        print(f"\nPostgreSQL replicas: visibility lag over 30 writes: median {1000 * statistics.median(lags):.1f} ms, "
              f"max {1000 * max(lags):.1f} ms (feed polled every 20 ms)")
        assert max(lags) < 2.0
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
