"""Prometheus text exposition of the service's counters and histograms (no client library needed)."""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.sum += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{edge:g}"}} {c}' for edge, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        out += [f"{name}_sum{{{labels}}} {self.sum:.6f}", f"{name}_count{{{labels}}} {self.n}"]
        return out


class ServiceMetrics:
    """Requests per route and status, latency per route, embedding batch sizes; gauges are read at scrape time."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.batches = Histogram(BATCH_BUCKETS)

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1
            self.latency.setdefault((method, route), Histogram(BUCKETS)).observe(seconds)

    def batch(self, size: int) -> None:
        """One model call of the micro-batcher, over ``size`` samples."""
        with self._lock:
            self.batches.observe(size)

    def render(self, service, in_flight: int) -> str:
        with self._lock:
            lines = ["# HELP metrix_requests_total Requests by method, route and status.",
                     "# TYPE metrix_requests_total counter"]
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f'metrix_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
            lines += ["# HELP metrix_request_seconds Request latency by method and route.",
                      "# TYPE metrix_request_seconds histogram"]
            for (method, route), hist in sorted(self.latency.items()):
                lines += hist.lines("metrix_request_seconds", f'method="{method}",route="{route}"')
            lines += ["# HELP metrix_embed_batch_size Samples per model call of the micro-batcher.",
                      "# TYPE metrix_embed_batch_size histogram"]
            lines += self.batches.lines("metrix_embed_batch_size", "")
        lines += ["# HELP metrix_embed_queue Requests waiting for the model.", "# TYPE metrix_embed_queue gauge",
                  f"metrix_embed_queue {0 if service.batcher is None else service.batcher.waiting}",
                  "# HELP metrix_requests_in_flight Requests being served.", "# TYPE metrix_requests_in_flight gauge",
                  f"metrix_requests_in_flight {in_flight}",
                  "# HELP metrix_index_items Items per collection or gallery.", "# TYPE metrix_index_items gauge"]
        for c in service.collections():
            lines.append(f'metrix_index_items{{collection="{c["name"]}",kind="{c["kind"]}"}} {c["count"]}')
        return "\n".join(lines) + "\n"
