"""A real ``metrix serve`` killed with SIGKILL at random moments while a client upserts and enrols without
pause, restarted each time: every acknowledged write is there afterwards, an unacknowledged batch is there whole
or not at all, and the rebuilt index answers exactly as brute force over the store."""

import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

KILLS = int(os.environ.get("METRIX_SERVE_KILLS", "20"))
DIM = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url, method, path, token, body=None, timeout=5.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.status, json.loads(response.read() or b"null")


def _start_args(store, port, *extra):
    return [sys.executable, "-m", "metrix", "serve", "--store", str(store), "--port", str(port), *extra]


def _start(store, port):
    proc = subprocess.Popen(_start_args(store, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return _wait_ready(proc, port)


def _wait_ready(proc, port):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return proc
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.03)
    proc.kill()
    raise AssertionError("the server did not become ready")


class Writer(threading.Thread):
    """Upserts batches of 3 items and enrols samples as fast as the server answers; records what was
    acknowledged (a 2xx arrived) and what was attempted without an answer (the server died meanwhile)."""

    def __init__(self, url, token, rng, tag):
        super().__init__(daemon=True)
        self.url, self.token, self.rng, self.tag = url, token, rng, tag
        self.acked_batches, self.unknown_batches, self.acked_enrols, self.unknown_enrols = [], [], [], []
        self.stop, self.n = threading.Event(), 0

    def run(self):
        while not self.stop.is_set():
            self.n += 1
            if self.n % 3:
                batch = [{"id": f"w{self.tag}-{self.n}-{j}", "vector": self.rng.normal(size=DIM).round(4).tolist(),
                          "metadata": {"n": self.n}} for j in range(3)]
                self._send("/v1/collections/items/items", {"items": batch}, batch, self.acked_batches, self.unknown_batches)
            else:
                sample = {"vector": self.rng.normal(size=DIM).round(4).tolist()}
                body = {"identity": f"p{self.n % 5}", "samples": [sample]}
                self._send("/v1/galleries/faces/enroll", body, body, self.acked_enrols, self.unknown_enrols)

    def _send(self, path, body, record, acked, unknown):
        try:
            status, _ = _call(self.url, "POST", path, self.token, body)
            assert status == 200
            acked.append(record)
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError, TimeoutError):
            unknown.append(record)
            self.stop.set()  # the server is gone: wait for the next one


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_acknowledged_writes_survive_sigkill_and_the_index_equals_brute_force(tmp_path):
    from metrix.serve.keys import create_key
    from metrix.serve.store import SQLiteStore

    store_dir = tmp_path / "store"
    token = create_key(SQLiteStore(store_dir), ["admin"])
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(store_dir, port)
    _call(url, "POST", "/v1/collections", token, {"name": "items", "dim": DIM})
    _call(url, "POST", "/v1/galleries", token, {"name": "faces", "dim": DIM})
    rng, timing = np.random.default_rng(0), random.Random(0)
    writers = []
    for kill in range(KILLS):
        writer = Writer(url, token, rng, kill)
        writers.append(writer)
        writer.start()
        time.sleep(timing.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        writer.join(10)
        proc = _start(store_dir, port)
    try:
        acked = [b for w in writers for b in w.acked_batches]
        unknown = [b for w in writers for b in w.unknown_batches]
        enrols = [e for w in writers for e in w.acked_enrols]
        assert len(acked) > 5 * KILLS and len(enrols) > KILLS  # the client really wrote between the kills
        db = sqlite3.connect(store_dir / "metrix.db")
        stored = {row[0]: np.frombuffer(row[1], dtype=np.float32)
                  for row in db.execute("SELECT item_id, vector FROM items WHERE collection = 'items'")}
        lost = [item["id"] for batch in acked for item in batch if item["id"] not in stored]
        assert lost == []
        for batch in acked:
            for item in batch:
                np.testing.assert_array_equal(stored[item["id"]], np.float32(item["vector"]))
        partial = [b[0]["id"] for b in unknown if len({item["id"] in stored for item in b}) != 1]
        assert partial == []  # an unacknowledged batch landed whole or not at all
        faces = [np.frombuffer(r[0], dtype=np.float32) for r in db.execute("SELECT vector FROM items WHERE collection = 'faces'")]
        held = {v.tobytes() for v in faces}
        assert all(np.float32(e["samples"][0]["vector"]).tobytes() in held for e in enrols)
        # the restarted server's index answers exactly as brute force over the store
        _, count = _call(url, "GET", "/v1/collections/items/count", token)
        assert count["count"] == len(stored)
        ids = list(stored)
        matrix = np.stack([stored[i] for i in ids])
        for q in rng.normal(size=(5, DIM)):
            _, hits = _call(url, "POST", "/v1/collections/items/search", token, {"query": {"vector": q.tolist()}, "k": 10})
            d = np.linalg.norm(matrix.astype(np.float64) - q.astype(np.float32), axis=1)
            want = [ids[i] for i in np.argsort(d, kind="stable")[:10]]
            assert [h["id"] for h in hits["results"]] == want
        print(f"\nserve crash test: {KILLS} kills, {len(acked)} acknowledged upserts (×3 items), "
              f"{len(enrols)} acknowledged enrolments, {len(unknown)} unanswered batches, lost 0")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
