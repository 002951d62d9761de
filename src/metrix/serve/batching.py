"""Micro-batching: requests that arrive together share one model call (or one index search).

A request waits in a bounded queue; one worker thread takes the first waiting request, gathers more until
``max_batch`` samples are collected or ``max_delay`` has passed since the first arrived, runs them in one call
and hands each request its part. A full queue refuses new work at once (:class:`Saturated`, HTTP 429) instead
of letting latency grow without bound. One slow GEMM over 16 queries costs about what one query alone costs on
a memory-bound scan, which is where the throughput comes from.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Sequence



class Saturated(RuntimeError):
    """The service is at capacity; the client should retry after a short wait."""


class MicroBatcher:
    """Runs ``fn`` over micro-batches of submitted payloads.

    Parameters
    ----------
    fn : ``fn(payloads) -> results``, one result per payload, for a list of payloads; called from the worker
        thread only
    max_batch : samples per call at most (a request larger than this is its own batch)
    max_delay : seconds the first request of a batch waits for company
    max_queue : requests waiting at most; more raise :class:`Saturated`
    on_batch : called with the sample count of every call (metrics)
    """

    def __init__(self, fn: Callable[[list], Sequence], max_batch: int = 64, max_delay: float = 0.005,
                 max_queue: int = 256, on_batch: Callable[[int], None] | None = None):
        if int(max_batch) < 1 or float(max_delay) < 0 or int(max_queue) < 1:
            raise ValueError("max_batch and max_queue must be >= 1 and max_delay >= 0")
        self.fn, self.max_batch, self.max_delay = fn, int(max_batch), float(max_delay)
        self._queue: queue.Queue = queue.Queue(maxsize=int(max_queue))
        self.on_batch = on_batch
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._loop, name="metrix-microbatcher", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, payload: Any, size: int | None = None) -> Future:
        """Queue ``payload`` (``size`` samples; default its length) and return a future of its result."""
        future: Future = Future()
        try:
            self._queue.put_nowait((payload, len(payload) if size is None else int(size), future))
        except queue.Full:
            raise Saturated("the service's queue is full; retry shortly") from None
        return future

    def __call__(self, payload: Any, timeout: float = 60.0) -> Any:
        return self.submit(payload).result(timeout)

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch, size = [first], first[1]
            deadline = time.monotonic() + self.max_delay
            while size < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
                size += item[1]
            self._run(batch, size)

    def _run(self, batch, size: int) -> None:
        if self.on_batch is not None:
            self.on_batch(size)
        try:
            results = self.fn([payload for payload, _, _ in batch])
        except BaseException as exc:  # noqa: BLE001 - every waiting request learns what went wrong
            if len(batch) == 1:
                batch[0][2].set_exception(exc)
                return
            for payload, _, future in batch:  # one bad request must not fail the others: run them alone
                try:
                    future.set_result(self.fn([payload])[0])
                except BaseException as own:  # noqa: BLE001
                    future.set_exception(own)
            return
        for (_, _, future), result in zip(batch, results):
            future.set_result(result)
