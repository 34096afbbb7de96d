"""The metrics registry's text format, the server's request timer, and the access-log middleware."""

import json
import logging
import threading

import pytest

from binarylm.serve.observability import (
    AccessLogMiddleware,
    Counter,
    Histogram,
    Registry,
    ServerMetrics,
    access_log_middleware,
)


def test_counter_and_gauge_render_in_the_exposition_format_with_escaped_labels():
    registry = Registry()
    counter = registry.counter("demo_total", 'Things\\done,\nin "total".', ("kind",))
    gauge = registry.gauge("demo_level", "A level.")
    counter.inc(kind='say "hi"')
    counter.inc(2, kind="back\\slash\nnewline")
    gauge.set(5)
    gauge.inc(0.5)
    gauge.dec(2)
    assert registry.render() == (
        '# HELP demo_total Things\\\\done,\\nin "total".\n'
        "# TYPE demo_total counter\n"
        'demo_total{kind="back\\\\slash\\nnewline"} 2\n'
        'demo_total{kind="say \\"hi\\""} 1\n'
        "# HELP demo_level A level.\n"
        "# TYPE demo_level gauge\n"
        "demo_level 3.5\n"
    )


def test_histogram_buckets_are_cumulative_and_inf_equals_count():
    registry = Registry()
    histogram = registry.histogram("demo_seconds", "Latency.", buckets=(0.1, 1, 5), labelnames=("route",))
    for value in (0.05, 0.1, 0.7, 3, 100):
        histogram.observe(value, route="/a")
    assert registry.render() == (
        "# HELP demo_seconds Latency.\n"
        "# TYPE demo_seconds histogram\n"
        'demo_seconds_bucket{route="/a",le="0.1"} 2\n'
        'demo_seconds_bucket{route="/a",le="1"} 3\n'
        'demo_seconds_bucket{route="/a",le="5"} 4\n'
        'demo_seconds_bucket{route="/a",le="+Inf"} 5\n'
        'demo_seconds_sum{route="/a"} 103.85\n'
        'demo_seconds_count{route="/a"} 5\n'
    )
    assert histogram.value(route="/a") == ([2, 3, 4, 5], 103.85, 5)


def test_unlabelled_metrics_start_at_zero_and_mistakes_are_named():
    registry = Registry()
    registry.histogram("empty_seconds", "Nothing yet.", buckets=(1,))
    assert 'empty_seconds_bucket{le="+Inf"} 0\nempty_seconds_sum 0\nempty_seconds_count 0\n' in registry.render()
    counter = registry.counter("c_total", "C.", ("outcome",))
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc(result="ok")
    with pytest.raises(ValueError, match="only go up"):
        counter.inc(-1, outcome="ok")
    with pytest.raises(ValueError, match="already registered"):
        registry.counter("c_total", "again")
    with pytest.raises(ValueError, match="not valid"):
        Counter("bad-name", "x")
    with pytest.raises(ValueError, match="'le'"):
        Histogram("h", "x", buckets=(1,), labelnames=("le",))


def test_concurrent_updates_from_threads_sum_correctly():
    counter = Counter("hits_total", "Hits.", ("worker",))
    histogram = Histogram("work_seconds", "Work.", buckets=(0.5,))

    def work(worker: int) -> None:
        for _ in range(5000):
            counter.inc(worker=worker % 2)
            histogram.observe(0.25)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.value(worker=0) == counter.value(worker=1) == 20000
    assert histogram.value() == ([40000, 40000], 10000.0, 40000)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_request_timer_observations_land_in_the_right_histograms():
    clock = FakeClock()
    metrics = ServerMetrics(clock=clock)
    timer = metrics.request_started()
    clock.now += 0.5
    timer.admitted()
    timer.admitted()  # only the first counts
    clock.now += 0.25
    timer.token()  # 0.75 s after arrival
    clock.now += 0.125
    timer.token()
    clock.now += 0.0625
    timer.token()
    timer.finished("ok", prompt_tokens=7, generated_tokens=3)
    timer.finished("error", prompt_tokens=7, generated_tokens=3)  # ignored: the request already ended
    assert metrics.queue_time.value()[1:] == (0.5, 1)
    assert metrics.time_to_first_token.value()[1:] == (0.75, 1)
    assert metrics.inter_token_latency.value()[1:] == (0.1875, 2)
    assert metrics.request_latency.value()[1:] == (0.9375, 1)
    assert metrics.requests.value(outcome="ok") == 1 and metrics.requests.value(outcome="error") == 0
    assert metrics.prompt_tokens.value() == 7 and metrics.generation_tokens.value() == 3
    metrics.set_queue(running=2, waiting=5)
    text = metrics.render()
    assert "\nbinarylm_requests_running 2\n" in text and "\nbinarylm_requests_waiting 5\n" in text
    assert 'binarylm_requests_total{outcome="ok"} 1\n' in text
    assert "# TYPE binarylm_time_to_first_token_seconds histogram\n" in text
    with pytest.raises(ValueError, match="outcome"):
        metrics.request_started().finished("fine")


fastapi = pytest.importorskip("fastapi")
from fastapi.responses import StreamingResponse  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture()
def logged_app(caplog):
    metrics = ServerMetrics()
    app = fastapi.FastAPI()

    @app.get("/items/{item}")
    async def item(item: int, request: fastapi.Request) -> dict:
        return {"item": item, "request_id": request.state.request_id}

    @app.get("/stream")
    async def stream():
        async def events():
            for i in range(3):
                yield f"data: {i}\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    app.add_middleware(AccessLogMiddleware, logger=logging.getLogger("test.access"), metrics=metrics)
    caplog.set_level(logging.INFO, logger="test.access")
    return TestClient(app), metrics, caplog


def access_lines(caplog) -> list[dict]:
    return [json.loads(record.getMessage()) for record in caplog.records if record.name == "test.access"]


def test_middleware_echoes_a_sane_request_id_and_logs_one_json_line(logged_app):
    client, metrics, caplog = logged_app
    response = client.get("/items/4", headers={"x-request-id": "abc-123.x"})
    assert response.headers["x-request-id"] == "abc-123.x"
    assert response.json() == {"item": 4, "request_id": "abc-123.x"}
    [line] = access_lines(caplog)
    assert set(line) >= {"time", "request_id", "method", "path", "status", "duration_ms", "client"}
    assert line["request_id"] == "abc-123.x" and line["method"] == "GET" and line["path"] == "/items/4"
    assert line["status"] == 200 and line["route"] == "/items/{item}" and line["duration_ms"] >= 0
    assert line["time"].endswith("Z") and "T" in line["time"]
    assert line["client"].startswith("testclient")
    assert metrics.http_requests.value(route="/items/{item}", status=200) == 1


@pytest.mark.parametrize("bad", ["x" * 500, "has spaces", "", "-leading-dash"])
def test_middleware_replaces_an_insane_request_id(logged_app, bad):
    client, _, caplog = logged_app
    response = client.get("/items/1", headers={"x-request-id": bad})
    given = response.headers["x-request-id"]
    assert given != bad and len(given) == 32 and int(given, 16) >= 0
    assert access_lines(caplog)[0]["request_id"] == given


def test_middleware_logs_streamed_responses_when_they_end_and_counts_statuses(logged_app):
    client, metrics, caplog = logged_app
    response = client.get("/stream")
    assert response.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert len(response.headers["x-request-id"]) == 32
    client.get("/nowhere")
    client.get("/also/nowhere")
    first, *missing = access_lines(caplog)
    assert first["path"] == "/stream" and first["status"] == 200 and first["bytes"] == len(response.content)
    assert [m["status"] for m in missing] == [404, 404]
    assert metrics.http_requests.value(route="/stream", status=200) == 1
    assert metrics.http_requests.value(route="<unmatched>", status=404) == 2
    assert 'binarylm_http_requests_total{route="<unmatched>",status="404"} 2\n' in metrics.render()


def test_access_log_middleware_wraps_a_plain_asgi_app(caplog):
    async def plain(scope, receive, send):
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-request-id", b"spoofed")]})
        await send({"type": "http.response.body", "body": b"ok"})

    caplog.set_level(logging.INFO, logger="test.access")
    response = TestClient(access_log_middleware(plain, logging.getLogger("test.access"))).get("/")
    assert response.status_code == 201 and response.headers.get_list("x-request-id") != ["spoofed"]
    assert len(response.headers.get_list("x-request-id")) == 1
    assert access_lines(caplog)[0]["route"] == "<unmatched>"
