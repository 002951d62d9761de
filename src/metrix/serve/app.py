"""The HTTP shell over :class:`~metrix.serve.service.Service`: routes, keys and scopes, limits, one error
boundary, metrics and the web page. Every route except ``/healthz``, ``/readyz`` and the page itself needs an API
key (``Authorization: Bearer mxk_...`` or ``X-API-Key``): 401 without one, 403 with too small a scope.

Bad input never reaches a 500: the service's own exceptions map to 400 (invalid), 404 (unknown name), 409
(conflicts with the store), 413 (body too large) and 429 (saturated, with ``Retry-After``), each as
``{"error": {"status": ..., "message": "what is wrong"}}``; a request that is refused changes nothing.
"""

from __future__ import annotations

import threading
import time
from importlib import resources
from typing import Any, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from metrix.serve.batching import Saturated
from metrix.serve.keys import allows, check_token
from metrix.serve.metrics import ServiceMetrics
from metrix.serve.service import Conflict, NotFound, Service

API_VERSION = "v1"


# ------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Input(_Body):
    """One thing to compare: a precomputed ``vector``, raw ``input`` values the run embeds, an ``image``
    (base64 file bytes), or a ``text`` (for a text run)."""

    vector: Optional[list[float]] = None
    input: Optional[list[float]] = None
    image: Optional[str] = None
    text: Optional[str] = None


class Item(Input):
    id: Optional[str] = Field(None, description="Item id (generated when missing); an existing id is replaced.")
    metadata: Optional[dict[str, Any]] = None
    label: Optional[str] = None


class EmbedRequest(_Body):
    inputs: list[Input]


class CollectionRequest(_Body):
    name: str
    kind: str = Field("collection", description="'collection' (search) or 'gallery' (verification).")
    metric: Optional[str] = Field(None, description="Default: the run's metric.")
    index_type: str = Field("exact", description="exact, faiss:Flat, faiss:HNSW32 or faiss:IVF256,Flat.")
    dim: Optional[int] = Field(None, description="Only without a run: the vectors' dimension.")


class UpsertRequest(_Body):
    items: list[Item]


class DeleteRequest(_Body):
    ids: list[str]


class SearchRequest(_Body):
    query: Input
    k: int = 10
    filter: Optional[dict[str, Any]] = Field(None, description="Only items whose metadata has these key/values.")
    radius: Optional[float] = Field(None, description="Only items within this distance (dot: at least this similarity).")
    nprobe: Optional[int] = Field(None, description="IVF lists to visit, for this request only.")
    ef_search: Optional[int] = Field(None, description="HNSW candidate list size, for this request only.")


class GalleryRequest(_Body):
    name: str
    metric: Optional[str] = Field(None, description="euclidean (default) or cosine.")
    dim: Optional[int] = Field(None, description="Only without a run: the vectors' dimension.")


class EnrollRequest(_Body):
    identity: str
    samples: list[Input]


class VerifyRequest(_Body):
    identity: str
    probe: Input


class IdentifyRequest(_Body):
    probe: Input
    k: int = 1


class LabelledInput(Input):
    label: str


class CalibrateRequest(_Body):
    samples: list[LabelledInput]
    target_far: Optional[float] = Field(None, description="Target false-accept rate (default: best pair accuracy).")


def _dump(items) -> list[dict]:
    return [i.model_dump(exclude_none=True) for i in items]


# ------------------------------------------------------------------ the app
class _Limits:
    """Pure ASGI middleware: refuses bodies over the limit (413) and requests beyond the concurrency limit (429)."""

    def __init__(self, app, max_body: int, max_concurrent: int, state, metrics: ServiceMetrics):
        self.app, self.max_body, self.state, self.metrics = app, max_body, state, metrics
        self.slots = threading.BoundedSemaphore(max_concurrent)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._limited(scope, receive, sending)
        finally:  # per route template (the router put it in the scope), so ids do not explode the labels
            route = scope.get("route")
            self.metrics.record(scope.get("method", ""), getattr(route, "path", "unmatched"), status[0],
                                time.perf_counter() - start)

    async def _limited(self, scope, receive, send):
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _error(413, f"the request body is larger than {self.max_body} bytes")(scope, receive, send)
        if not self.slots.acquire(blocking=False):
            return await _error(429, "too many concurrent requests; retry shortly", {"Retry-After": "1"})(scope, receive, send)
        self.state.in_flight += 1
        try:
            if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
                # no declared length (chunked): read the body here, refusing it once it passes the limit
                chunks, size, more = [], 0, True
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        return
                    chunks.append(message.get("body", b""))
                    size, more = size + len(chunks[-1]), message.get("more_body", False)
                    if size > self.max_body:
                        return await _error(413, f"the request body is larger than {self.max_body} bytes")(
                            scope, receive, send)
                body = b"".join(chunks)

                async def replay():
                    nonlocal body
                    out, body = {"type": "http.request", "body": body, "more_body": False}, b""
                    return out

                return await self.app(scope, replay, send)
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1
            self.slots.release()


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


def create_app(service: Service, insecure_no_auth: bool = False) -> FastAPI:
    """The FastAPI application over ``service``. ``insecure_no_auth`` lets every request in without a key
    (``metrix serve`` allows it on a loopback address only)."""
    metrics = ServiceMetrics()
    if service.batcher is not None:
        service.batcher.on_batch = metrics.batch
    app = FastAPI(title="metrix", version=API_VERSION,
                  description="Search, verification and embeddings with a learned metric.")

    class State:
        in_flight = 0

    state = State()

    # ------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(422, f"the body is not valid JSON (at character {first.get('loc', ('', '?'))[-1]})")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):  # FastAPI's own (unparsable body, 404, 405)
        detail = exc.detail if isinstance(exc.detail, str) else "invalid request"
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the body is not valid JSON"
        return _error(exc.status_code, detail, exc.headers)

    handlers = {NotFound: 404, Conflict: 409, Saturated: 429, ValueError: 400, TypeError: 400}
    for kind, status in handlers.items():
        def handler(request: Request, exc: Exception, status=status):
            text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            return _error(status, " ".join(str(text).split()) or type(exc).__name__,
                          {"Retry-After": "1"} if status == 429 else None)
        app.add_exception_handler(kind, handler)

    # ------------------------------------------------------------ keys
    def require(scope: str):
        def check(request: Request) -> Optional[str]:
            if insecure_no_auth:
                return None
            header = request.headers.get("authorization", "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
            found = check_token(service.store, token)
            if found is None:
                raise _Unauthorized()
            key_id, scopes = found
            if not allows(scopes, scope):
                raise _Forbidden(scope)
            return key_id
        return Depends(check)

    @app.exception_handler(_Unauthorized)
    async def _401(request, exc):
        return _error(401, "an API key is required: send 'Authorization: Bearer mxk_...' "
                           "(create one with 'metrix serve keys create')", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(_Forbidden)
    async def _403(request, exc):
        return _error(403, f"this key lacks the '{exc.args[0]}' scope")

    # ------------------------------------------------------------ health, page, metrics
    @app.get("/healthz", include_in_schema=False)
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz():
        if not getattr(service, "ready", False):
            return _error(503, "starting")
        return {"status": "ready", "collections": len(service.collections())}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return resources.files("metrix.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/metrics", response_class=PlainTextResponse, tags=["service"])
    def prometheus(key=require("read")):
        return metrics.render(service, state.in_flight)

    v1 = f"/{API_VERSION}"

    @app.get(f"{v1}/info", tags=["service"])
    def info(key=require("read")):
        run = service.run
        return {"dim": service.dim, "metric": None if run is None else run.metric,
                "kind": None if run is None else run.kind,
                "input_shape": None if run is None or run.input_spec is None else list(run.input_spec.shape),
                "limits": service.limits.__dict__}

    # ------------------------------------------------------------ embeddings
    @app.post(f"{v1}/embed", tags=["embeddings"])
    def embed(body: EmbedRequest, key=require("read")):
        emb = service.embed(_dump(body.inputs))
        return {"dim": int(emb.shape[1]), "embeddings": emb.tolist()}

    # ------------------------------------------------------------ collections
    @app.get(f"{v1}/collections", tags=["collections"])
    def list_collections(key=require("read")):
        return {"collections": service.collections()}

    @app.post(f"{v1}/collections", status_code=201, tags=["collections"])
    def create_collection(body: CollectionRequest, key=require("admin")):
        return service.create_collection(body.name, body.kind, body.metric, body.index_type, body.dim, key_id=key)

    @app.get(f"{v1}/collections/{{name}}", tags=["collections"])
    def get_collection(name: str, key=require("read")):
        return service.collection(name)

    @app.delete(f"{v1}/collections/{{name}}", tags=["collections"])
    def delete_collection(name: str, key=require("admin")):
        service.delete_collection(name, key_id=key)
        return {"deleted": name}

    @app.post(f"{v1}/collections/{{name}}/items", tags=["items"])
    def upsert(name: str, body: UpsertRequest, key=require("write")):
        return service.upsert(name, _dump(body.items), key_id=key)

    @app.get(f"{v1}/collections/{{name}}/items/{{item_id}}", tags=["items"])
    def get_item(name: str, item_id: str, key=require("read")):
        return service.get_item(name, item_id)

    @app.delete(f"{v1}/collections/{{name}}/items/{{item_id}}", tags=["items"])
    def delete_item(name: str, item_id: str, key=require("write")):
        out = service.delete_items(name, [item_id], key_id=key)
        if not out["deleted"]:
            raise NotFound(f"no item {item_id!r} in {name!r}")
        return out

    @app.post(f"{v1}/collections/{{name}}/delete", tags=["items"])
    def delete_items(name: str, body: DeleteRequest, key=require("write")):
        return service.delete_items(name, body.ids, key_id=key)

    @app.get(f"{v1}/collections/{{name}}/count", tags=["items"])
    def count(name: str, key=require("read")):
        return {"count": service.count(name)}

    @app.post(f"{v1}/collections/{{name}}/search", tags=["search"])
    def search(name: str, body: SearchRequest, key=require("read")):
        hits = service.search(name, body.query.model_dump(exclude_none=True), body.k, body.filter, body.radius,
                              body.nprobe, body.ef_search)
        return {"results": hits}

    # ------------------------------------------------------------ verification
    @app.post(f"{v1}/galleries", status_code=201, tags=["verification"])
    def create_gallery(body: GalleryRequest, key=require("admin")):
        return service.create_collection(body.name, "gallery", body.metric, "exact", body.dim, key_id=key)

    @app.get(f"{v1}/galleries/{{name}}/identities", tags=["verification"])
    def identities(name: str, key=require("read")):
        return {"identities": service.identities(name)}

    @app.post(f"{v1}/galleries/{{name}}/enroll", tags=["verification"])
    def enroll(name: str, body: EnrollRequest, key=require("write")):
        return service.enroll(name, body.identity, _dump(body.samples), key_id=key)

    @app.delete(f"{v1}/galleries/{{name}}/identities/{{identity}}", tags=["verification"])
    def remove_identity(name: str, identity: str, key=require("write")):
        return service.remove_identity(name, identity, key_id=key)

    @app.post(f"{v1}/galleries/{{name}}/verify", tags=["verification"])
    def verify(name: str, body: VerifyRequest, key=require("read")):
        return service.verify(name, body.identity, body.probe.model_dump(exclude_none=True))

    @app.post(f"{v1}/galleries/{{name}}/identify", tags=["verification"])
    def identify(name: str, body: IdentifyRequest, key=require("read")):
        return service.identify(name, body.probe.model_dump(exclude_none=True), body.k)

    @app.post(f"{v1}/galleries/{{name}}/calibrate", tags=["verification"])
    def calibrate(name: str, body: CalibrateRequest, key=require("admin")):
        return service.calibrate(name, _dump(body.samples), body.target_far, key_id=key)

    @app.get(f"{v1}/audit", tags=["service"])
    def audit(limit: int = 100, key=require("admin")):
        if not 1 <= limit <= 10000:
            raise ValueError("limit must be in [1, 10000]")
        return {"entries": service.store.audit_log(limit)}

    wrapped = _Limits(app, service.limits.max_body_bytes, service.limits.max_concurrent, state, metrics)
    wrapped.fastapi = app  # the FastAPI object (routes, OpenAPI schema) behind the limits
    return wrapped


class _Unauthorized(Exception):
    pass


class _Forbidden(Exception):
    pass
