"""Micro-batching: requests that arrive together share one model call.

A request's samples wait in a bounded queue; one worker thread takes the first waiting request, gathers more
until ``max_batch`` samples are collected or ``max_delay`` has passed since the first arrived, embeds them in one
call and hands each request its rows. A full queue refuses new work at once (:class:`Saturated`, HTTP 429)
instead of letting latency grow without bound.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

import numpy as np


class Saturated(RuntimeError):
    """The service is at capacity; the client should retry after a short wait."""


class MicroBatcher:
    """Runs ``fn`` (a (n, ...) array → (n, d) array) over micro-batches of the submitted requests.

    Parameters
    ----------
    fn : the batched function (e.g. ``run.embed``); called from the worker thread only
    max_batch : samples per call at most (a request larger than this is its own batch)
    max_delay : seconds the first request of a batch waits for company
    max_queue : requests waiting at most; more raise :class:`Saturated`
    on_batch : called with the sample count of every model call (metrics)
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch: int = 64, max_delay: float = 0.005,
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

    def submit(self, x: np.ndarray) -> Future:
        """Queue ``x`` (n, ...) and return a future of its (n, d) result."""
        future: Future = Future()
        try:
            self._queue.put_nowait((x, future))
        except queue.Full:
            raise Saturated("the embedding queue is full; retry shortly") from None
        return future

    def __call__(self, x: np.ndarray, timeout: float = 60.0) -> np.ndarray:
        return self.submit(x).result(timeout)

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch, size = [first], len(first[0])
            deadline = time.monotonic() + self.max_delay
            while size < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
                size += len(item[0])
            self._run(batch, size)

    def _run(self, batch, size: int) -> None:
        if self.on_batch is not None:
            self.on_batch(size)
        try:
            out = self.fn(np.concatenate([x for x, _ in batch]) if len(batch) > 1 else batch[0][0])
        except BaseException as exc:  # every waiting request learns what went wrong
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            for x, future in batch:  # one bad request must not fail the others: run them alone
                try:
                    future.set_result(self.fn(x))
                except BaseException as own:
                    future.set_exception(own)
            return
        start = 0
        for x, future in batch:
            future.set_result(out[start : start + len(x)])
            start += len(x)
