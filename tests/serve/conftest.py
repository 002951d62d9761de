import numpy as np
import pytest

pytest.importorskip("fastapi", reason="metrix serve needs the serve extra")
pytest.importorskip("httpx", reason="the service tests need httpx (the test extra)")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A small run trained on the digits (one epoch): the service's model."""
    from metrix.jobs.train import TrainConfig, train

    out = tmp_path_factory.mktemp("serve-run") / "run"
    result = train(TrainConfig.from_sources(None, epochs=1, out=str(out), progress=False, checkpoint_every=0),
                   echo=lambda *a: None)
    return result["run_dir"]


@pytest.fixture(scope="session")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target


class Client:
    """A TestClient with a key for each scope."""

    def __init__(self, service, keys):
        from fastapi.testclient import TestClient

        from metrix.serve.app import create_app

        self.asgi = create_app(service)
        self.http = TestClient(self.asgi, raise_server_exceptions=False)
        self.keys, self.service = keys, service

    def __call__(self, method, path, scope="admin", **kw):
        headers = kw.pop("headers", {})
        if scope is not None:
            headers["Authorization"] = f"Bearer {self.keys[scope]}"
        return self.http.request(method, path, headers=headers, **kw)


@pytest.fixture
def make_client(digits_run, tmp_path):
    """``make_client(store_dir=None, run=True, **service_kw)`` → a Client over a Service on that store."""
    from metrix.runs import Run
    from metrix.serve.keys import create_key
    from metrix.serve.service import Service
    from metrix.serve.store import SQLiteStore

    made, run = [], Run.open(digits_run)

    def make(store_dir=None, with_run=True, **service_kw):
        store = SQLiteStore(store_dir or tmp_path / "store")
        existing = {k["name"]: k for k in store.keys()}
        keys = {}
        for scope in ("read", "write", "admin"):
            keys[scope] = create_key(store, [scope], f"test-{scope}-{len(existing)}")
        service = Service(run if with_run else None, store, **service_kw)
        made.append(service)
        return Client(service, keys)

    yield make
    for service in made:
        service.close()
