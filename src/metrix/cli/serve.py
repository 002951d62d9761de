"""metrix serve RUN --store DIR, and metrix serve keys create/list/revoke."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from metrix.cli.common import DEVICE, app, command_group, echo_rows, open_run

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class _StartByDefault(TyperGroup):
    """``metrix serve RUN ...`` means ``metrix serve start RUN ...``; ``keys`` is the one sub-group."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["start", *args]
        return super().parse_args(ctx, args)


serve_app = command_group(cls=_StartByDefault, help="Serve a trained run over HTTP: search, verification and "
                          "embeddings with a durable store, API keys and a web page (needs the serve extra).")
app.add_typer(serve_app, name="serve")
keys_app = command_group(help="API keys of a service's store (scopes: read ⊂ write ⊂ admin).")
serve_app.add_typer(keys_app, name="keys")

STORE = typer.Option(..., help="The store: a folder (SQLite, created if missing), or postgresql://user:password@host/db "
                                "(PostgreSQL, shared by several replicas).")


@serve_app.command("start")
def start(
    run: Optional[Path] = typer.Argument(None, metavar="RUN", help="A run folder written by 'metrix train' (or a folder holding one run); without it the service takes precomputed vectors only."),
    store: str = STORE,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="Let requests in without a key (loopback addresses only)."),
    max_batch: int = typer.Option(64, min=1, help="Samples per model call of the micro-batcher."),
    max_delay_ms: float = typer.Option(5.0, min=0, help="How long the first request of a micro-batch waits for company."),
    max_queue: int = typer.Option(256, min=1, help="Requests waiting for the model before new ones get 429."),
    max_concurrent: int = typer.Option(32, min=1, help="Requests served at once before new ones get 429."),
    max_body_mb: float = typer.Option(8.0, min=0.001, help="Largest request body, in MiB (413 beyond)."),
    follow_interval: float = typer.Option(0.05, min=0.001, help="Seconds between reads of the store's change feed (what other replicas wrote)."),
    device: str = DEVICE,
) -> None:
    """Start the service: rebuilds every collection's index from the store, then listens."""
    try:
        import uvicorn

        from metrix.serve.app import create_app
    except ImportError as exc:
        raise ImportError(f"metrix serve needs the serve extra: pip install 'metrix[serve]' ({exc})") from None
    from metrix.serve.service import Limits, Service
    from metrix.serve.store import open_store

    if insecure_no_auth and host not in LOOPBACK:
        raise ValueError(f"--insecure-no-auth is allowed on a loopback address only, not {host}")
    limits = Limits(max_concurrent=max_concurrent, max_body_bytes=int(max_body_mb * 2**20))
    service = Service(None if run is None else open_run(run, device), open_store(store), limits,
                      batching=(max_batch, max_delay_ms / 1000.0, max_queue))
    service.follow(follow_interval)
    counts = ", ".join(f"{c['name']} ({c['count']})" for c in service.collections()) or "none yet"
    where = store.split("@")[-1] if "://" in store else store  # never print a password
    typer.echo(f"metrix serve: store {where}, collections {counts}; listening on http://{host}:{port}/", err=True)
    uvicorn.run(create_app(service, insecure_no_auth), host=host, port=port, log_level="warning")


@keys_app.command("create")
def keys_create(
    store: str = STORE,
    scope: List[str] = typer.Option(..., "--scope", help="read, write or admin; repeat for several."),
    name: str = typer.Option("", help="A note saying whose key this is."),
) -> None:
    """Create an API key and print it (only its hash is stored: keep the printed token)."""
    from metrix.serve.keys import check_scopes, create_key
    from metrix.serve.store import open_store

    check_scopes(scope)  # before the store is opened (and made): a refused command leaves nothing behind
    typer.echo(create_key(open_store(store), scope, name))


@keys_app.command("list")
def keys_list(store: str = STORE, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The store's keys: id, scopes, note, and whether revoked (never the secrets)."""
    from metrix.serve.store import open_store

    echo_rows(open_store(store, create=False).keys(), as_json,
              lambda k: f"{k['key_id']}  {','.join(k['scopes']):<17} {'revoked' if k['revoked'] else 'active ':<8} {k['name']}")


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The id of the key (the part after 'mxk_')."),
                store: str = STORE) -> None:
    """Revoke a key: requests with it get 401 from then on (within a second on other replicas)."""
    from metrix.serve.store import open_store

    if not open_store(store, create=False).revoke_key(key_id):
        raise KeyError(f"no active key {key_id!r} in {store}")
    typer.echo(f"revoked {key_id}")
