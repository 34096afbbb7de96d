"""Metrics and access logs for the server, with no dependency beyond the standard library.

Three pieces:

    Registry, Counter, Gauge, Histogram   a small Prometheus client; `Registry.render()` writes the
                                          text exposition format 0.0.4 that GET /metrics returns
    ServerMetrics, RequestTimer           the server's own metrics (latencies, queue, tokens, outcomes)
    AccessLogMiddleware                   pure ASGI: a request id per request, one JSON log line per
                                          response (streamed ones included), http_requests_total

Every metric guards its values with a lock: the engine thread and the asyncio handlers update them
at the same time, and a scrape may read them meanwhile.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_number(value: float) -> str:
    """A sample value as Prometheus writes it: integers without a point, +Inf / -Inf / NaN spelled out."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels_text(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{_escape_label_value(value)}"' for name, value in pairs) + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"metric name {name!r} is not valid; use letters, digits, '_' and ':'")
        for label in labelnames:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"label name {label!r} of {name} is not valid; use letters, digits and '_'")
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], object] = {}
        if not self.labelnames:  # an unlabelled metric is exported from the start, at zero
            self._values[()] = self._new_value()

    def _new_value(self):
        return 0.0

    def _key(self, labels: dict[str, object]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.labelnames)

    def _add(self, amount: float, labels: dict[str, object]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        """The current value for these label values (0 if never touched)."""
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def _snapshot(self) -> list[tuple[tuple[str, ...], object]]:
        with self._lock:
            return sorted(self._values.items())

    def _samples(self) -> Iterable[str]:
        for key, value in self._snapshot():
            yield f"{self.name}{_labels_text(list(zip(self.labelnames, key)))} {format_number(value)}"

    def render(self) -> str:
        head = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        return "\n".join([*head, *self._samples()]) + "\n"


class Counter(_Metric):
    """A value that only goes up: `requests.inc(outcome="ok")`."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} can only go up; got inc({amount})")
        self._add(amount, labels)


class Gauge(_Metric):
    """A value that goes up and down: `running.set(3)`."""

    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1.0, **labels: object) -> None:
        self._add(-amount, labels)


class _HistogramValue:
    __slots__ = ("counts", "sum", "count")

    def __init__(self, n_buckets: int):
        self.counts = [0] * n_buckets  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.count = 0


class Histogram(_Metric):
    """Observations counted into buckets: `latency.observe(0.12)`; exported cumulatively, with _sum and _count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()):
        if "le" in labelnames:
            raise ValueError(f"histogram {name} cannot have a label named 'le'; the buckets use it")
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"histogram {name} needs distinct finite bucket bounds, got {list(buckets)}")
        self.bounds = (*bounds, math.inf)
        super().__init__(name, help, labelnames)

    def _new_value(self) -> _HistogramValue:
        return _HistogramValue(len(self.bounds))

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        bucket = min(bisect.bisect_left(self.bounds, value), len(self.bounds) - 1)  # the first bound >= value
        with self._lock:
            state = self._values.get(key)
            if state is None:
                state = self._values[key] = self._new_value()
            state.counts[bucket] += 1
            state.sum += value
            state.count += 1

    def value(self, **labels: object) -> tuple[list[int], float, int]:
        """(cumulative bucket counts, sum, count) for these label values."""
        key = self._key(labels)
        with self._lock:
            state = self._values.get(key) or self._new_value()
            counts, total, count = list(state.counts), state.sum, state.count
        return _cumulative(counts), total, count

    def _snapshot(self):
        with self._lock:
            return sorted((key, (list(s.counts), s.sum, s.count)) for key, s in self._values.items())

    def _samples(self) -> Iterable[str]:
        for key, (counts, total, count) in self._snapshot():
            pairs = list(zip(self.labelnames, key))
            for bound, cumulative in zip(self.bounds, _cumulative(counts)):
                yield f"{self.name}_bucket{_labels_text([*pairs, ('le', format_number(bound))])} {cumulative}"
            yield f"{self.name}_sum{_labels_text(pairs)} {format_number(total)}"
            yield f"{self.name}_count{_labels_text(pairs)} {count}"


def _cumulative(counts: list[int]) -> list[int]:
    running, out = 0, []
    for c in counts:
        running += c
        out.append(running)
    return out


class Registry:
    """The metrics one server exports, rendered in registration order."""

    def __init__(self):
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: _Metric) -> _Metric:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"a metric named {metric.name} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self.register(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self.register(Gauge(name, help, labelnames))

    def histogram(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> Histogram:
        return self.register(Histogram(name, help, buckets, labelnames))

    def render(self) -> str:
        """Every metric in the Prometheus text exposition format 0.0.4 (serve it with CONTENT_TYPE)."""
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(metric.render() for metric in metrics)


# --- the server's metrics -------------------------------------------------------------------------

OUTCOMES = ("ok", "error", "aborted", "rate_limited")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """The server's metrics, all named binarylm_*; `render()` is the body of GET /metrics."""

    def __init__(self, registry: Registry | None = None, clock: Callable[[], float] = time.perf_counter):
        self.registry = registry or Registry()
        self.clock = clock
        r, p = self.registry, "binarylm_"
        self.time_to_first_token = r.histogram(p + "time_to_first_token_seconds",
                                               "Seconds from a request's arrival to its first generated token.",
                                               LATENCY_BUCKETS)
        self.inter_token_latency = r.histogram(p + "inter_token_latency_seconds",
                                               "Seconds between consecutive generated tokens of a request.",
                                               TOKEN_BUCKETS)
        self.request_latency = r.histogram(p + "request_latency_seconds",
                                           "Seconds from a request's arrival to its end.", REQUEST_BUCKETS)
        self.queue_time = r.histogram(p + "queue_time_seconds",
                                      "Seconds a request waited before the engine admitted it.", LATENCY_BUCKETS)
        self.requests_running = r.gauge(p + "requests_running", "Requests the engine is decoding now.")
        self.requests_waiting = r.gauge(p + "requests_waiting", "Requests queued for a free engine slot.")
        self.prompt_tokens = r.counter(p + "prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = r.counter(p + "generation_tokens_total", "Tokens generated by finished requests.")
        self.requests = r.counter(p + "requests_total", "Finished generation requests, by outcome.", ("outcome",))
        self.http_requests = r.counter(p + "http_requests_total", "HTTP responses, by route and status.",
                                       ("route", "status"))

    def request_started(self) -> RequestTimer:
        """Start timing one generation request; call this when it arrives."""
        return RequestTimer(self)

    def set_queue(self, running: int, waiting: int) -> None:
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)

    def render(self) -> str:
        return self.registry.render()


class RequestTimer:
    """The clock of one generation request, from arrival to end. Use it from one thread at a time.

    admitted()   once, when the engine takes it from the queue        -> queue_time_seconds
    token()      for every generated token: the first                 -> time_to_first_token_seconds,
                 each later one (time since the previous)             -> inter_token_latency_seconds
    finished()   once, at the end; later calls are ignored            -> request_latency_seconds, requests_total,
                                                                         prompt / generation token counters
    """

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.start = metrics.clock()
        self._admitted = False
        self._last_token: float | None = None
        self._finished = False

    def admitted(self) -> None:
        if not self._admitted:
            self._admitted = True
            self.metrics.queue_time.observe(self.metrics.clock() - self.start)

    def token(self) -> None:
        now = self.metrics.clock()
        if self._last_token is None:
            self.metrics.time_to_first_token.observe(now - self.start)
        else:
            self.metrics.inter_token_latency.observe(now - self._last_token)
        self._last_token = now

    def finished(self, outcome: str, prompt_tokens: int = 0, generated_tokens: int = 0) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
        if self._finished:
            return
        self._finished = True
        m = self.metrics
        m.request_latency.observe(m.clock() - self.start)
        m.requests.inc(outcome=outcome)
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(generated_tokens)


# --- access logs ----------------------------------------------------------------------------------

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def request_id_from(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The client's x-request-id if it is sane (1-128 of letters, digits, '.', '_', ':', '-'), else a new one."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            if _SANE_REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class AccessLogMiddleware:
    """Pure ASGI middleware: one JSON access-log line per HTTP request, written when the response ends.

        app.add_middleware(AccessLogMiddleware, logger=logging.getLogger("binarylm.access"), metrics=metrics)

    Each request gets an id (the client's sane x-request-id, else a uuid4 hex), returned in the
    x-request-id response header and kept in `request.state.request_id` for the handlers. A streamed
    (SSE) response is logged once its last chunk is sent or its client goes away. The route label of
    http_requests_total is the matched route's template (/v1/models), never the raw path, so that
    scanners probing random paths add one series ("<unmatched>"), not thousands.
    """

    def __init__(self, app, logger: logging.Logger | None = None, metrics: ServerMetrics | None = None):
        self.app = app
        self.logger = logger or logging.getLogger("binarylm.access")
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = request_id
        arrived = datetime.now(UTC)
        started = time.perf_counter()
        response = {"status": 500, "bytes": 0}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER.encode(), request_id.encode())]}
            elif message["type"] == "http.response.body":
                response["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, request_id, arrived, time.perf_counter() - started, response)

    def _record(self, scope, request_id: str, arrived: datetime, seconds: float, response: dict) -> None:
        route = getattr(scope.get("route"), "path", None) or "<unmatched>"
        client = scope.get("client")
        line = {
            "time": arrived.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": request_id,
            "method": scope.get("method"),
            "path": scope.get("path"),
            "route": route,
            "status": response["status"],
            "duration_ms": round(seconds * 1000, 3),
            "bytes": response["bytes"],
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        self.logger.info(json.dumps(line, ensure_ascii=False))
        if self.metrics is not None:
            self.metrics.http_requests.inc(route=route, status=response["status"])


def access_log_middleware(app, logger: logging.Logger | None = None,
                          metrics: ServerMetrics | None = None) -> AccessLogMiddleware:
    """`app` wrapped in AccessLogMiddleware (for an ASGI app without add_middleware)."""
    return AccessLogMiddleware(app, logger, metrics)
