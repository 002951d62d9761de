"""Fuzzing the API from its own OpenAPI schema (schemathesis): no request gets a 500, and a refused request
(any 4xx) leaves the store exactly as it was."""

import hashlib

import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

KEY = {}


def _store_digest(store) -> str:
    """Everything the store holds that a request could change (not the audit log of successful writes)."""
    db = store._db()
    h = hashlib.sha256()
    for table, order in (("collections", "name"), ("items", "seq"), ("api_keys", "key_id")):
        for row in db.execute(f"SELECT * FROM {table} ORDER BY {order}"):
            h.update(repr(row).encode())
    return h.hexdigest()


@pytest.fixture
def api_schema(make_client, digits):
    X, y = digits
    client = make_client()
    client("POST", "/v1/collections", json={"name": "digits"})
    client("POST", "/v1/collections/digits/items", scope="write",
           json={"items": [{"id": f"d{i}", "input": X[i].tolist(), "metadata": {"d": int(y[i])}} for i in range(40)]})
    client("POST", "/v1/galleries", json={"name": "people"})
    for d in range(3):
        idx = np.flatnonzero(y == d)[:5]
        client("POST", "/v1/galleries/people/enroll", scope="write",
               json={"identity": str(d), "samples": [{"input": X[i].tolist()} for i in idx]})
    KEY.update(token=client.keys["admin"], store=client.service.store)
    return schemathesis.openapi.from_asgi("/openapi.json", client.asgi)


def test_no_500_and_refused_requests_change_nothing(api_schema):
    """Every operation of the schema, 20 generated requests each that fit the schema and 20 that break it
    (bodies, path and query values)."""
    from hypothesis import given

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    seen = {}
    for operation, mode in [(op, m) for op in operations for m in schemathesis.GenerationMode]:
        @given(case=operation.as_strategy(mode), known=st.sampled_from([None, "digits", "people"]),
               known_item=st.sampled_from([None, "d3", "0"]))
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(case, known, known_item):
            # half the requests name things that exist, so the checks past the 404 are reached too
            params = case.path_parameters or {}
            if known is not None and "name" in params:
                params["name"] = known
            for field in ("item_id", "identity"):
                if known_item is not None and field in params:
                    params[field] = known_item
            before = _store_digest(KEY["store"])
            response = case.call(headers={"Authorization": f"Bearer {KEY['token']}"})
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            if response.status_code >= 400:
                assert _store_digest(KEY["store"]) == before, (case.method, case.path, response.status_code)
                assert "error" in response.json(), (case.method, case.path, case.headers, case.query, response.status_code, response.text)
                message = response.json()["error"]["message"]
                assert isinstance(message, str) and message, response.text

        try:
            fuzz()
        except Unsatisfiable:  # nothing of this operation can break its schema (no body, no parameters)
            assert mode == schemathesis.GenerationMode.NEGATIVE
    print("statuses", sorted(seen.items()))
    assert sum(n for status, n in seen.items() if status < 300) > 0  # some requests got through, too
