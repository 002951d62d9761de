"""``metrix serve``: a durable, authenticated search and verification service over one trained run.

Layers, imports pointing down: :mod:`~metrix.serve.store` (SQLite), :mod:`~metrix.serve.keys`,
:mod:`~metrix.serve.batching` (micro-batches for the model), :mod:`~metrix.serve.service` (the long-lived object
that keeps the in-memory indexes equal to the store), :mod:`~metrix.serve.metrics` and :mod:`~metrix.serve.app`
(the FastAPI shell, needing the ``serve`` extra).
"""
