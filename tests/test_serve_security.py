"""The server's guards: API keys, rate limits, size caps, queue bound, CORS."""

import pytest
import torch

from binarylm.config import ModelConfig
from binarylm.errors import BinaryLMError
from binarylm.infer.engine import Engine
from binarylm.model import Transformer

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from binarylm.serve.app import create_app  # noqa: E402
from binarylm.serve.runner import EngineRunner  # noqa: E402
from binarylm.serve.security import ServerSettings, TokenBuckets, authorized_key, load_api_keys  # noqa: E402

KEY, OTHER = "k" * 24, "o" * 24


def client_with(tokenizer, **settings) -> tuple[TestClient, EngineRunner]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=64, n_layer=1, n_head=2,
                                    d_model=16)).eval()
    runner = EngineRunner(Engine(model, tokenizer, max_batch=2)).start()
    return TestClient(create_app(runner, tokenizer, "tiny", ServerSettings(**settings))), runner


def complete(client, key=None, **body):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return client.post("/v1/completions", json={"prompt": "x = 1", "max_tokens": 2, **body}, headers=headers)


def test_api_keys_guard_everything_but_health_and_metrics(small_tokenizer):
    client, runner = client_with(small_tokenizer, api_keys=[KEY, OTHER])
    try:
        assert complete(client).status_code == 401
        wrong = complete(client, key="x" * 24)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert complete(client, key=KEY).status_code == 200 and complete(client, key=OTHER).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
        assert client.get("/v1/models").status_code == 401
    finally:
        runner.stop()


def test_request_and_token_rate_limits_answer_429_with_retry_after(small_tokenizer):
    client, runner = client_with(small_tokenizer, requests_per_minute=2, tokens_per_minute=40)
    try:
        assert complete(client).status_code == 200 and complete(client).status_code == 200
        third = complete(client)
        assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
        assert third.json()["error"]["type"] == "rate_limit_error"
    finally:
        runner.stop()
    client, runner = client_with(small_tokenizer, tokens_per_minute=40)
    try:
        assert complete(client, max_tokens=100).status_code == 400  # beyond the context: refused, costs nothing
        assert complete(client, max_tokens=30).status_code == 200  # about 34 tokens of 40
        limited = complete(client, max_tokens=30)
        assert "token rate limit" in limited.json()["error"]["message"] and int(limited.headers["retry-after"]) >= 1
        too_big = complete(client, max_tokens=50)
        assert too_big.status_code == 400 and "more than the 40 per minute" in too_big.json()["error"]["message"]
        assert 'binarylm_requests_total{outcome="rate_limited"} 1' in client.get("/metrics").text
    finally:
        runner.stop()


def test_oversized_bodies_and_full_queues_are_refused(small_tokenizer):
    client, runner = client_with(small_tokenizer, max_body_bytes=200, max_waiting=0)
    try:
        assert complete(client, prompt="y" * 500).status_code == 413
        json_type = {"content-type": "application/json"}
        chunked = client.post("/v1/completions", content=iter([b'{"prompt": "', b"y" * 500, b'"}']), headers=json_type)
        assert "content-length" not in chunked.request.headers  # sent chunked: only the bytes can tell
        assert chunked.status_code == 413 and "larger than 200 bytes" in chunked.json()["error"]["message"]
        small = client.post("/v1/completions", content=iter([b'{"prompt": "hi", ', b'"max_tokens": 2}']),
                            headers=json_type)
        assert small.status_code == 429  # under the cap it reached the handler whole, which found the queue full
        full = complete(client)
        assert full.status_code == 429 and "queue is full" in full.json()["error"]["message"]
    finally:
        runner.stop()


def test_cors_is_off_by_default_and_follows_the_configured_origins(small_tokenizer):
    closed, runner = client_with(small_tokenizer)
    runner.stop()
    assert "access-control-allow-origin" not in closed.get("/health", headers={"origin": "https://a.example"}).headers
    opened, runner = client_with(small_tokenizer, cors_origins=["https://a.example"])
    runner.stop()
    assert opened.get("/health", headers={"origin": "https://a.example"}).headers[
        "access-control-allow-origin"] == "https://a.example"


def test_keys_come_from_the_environment_and_a_file_and_must_be_long(tmp_path, monkeypatch):
    monkeypatch.setenv("BINARYLM_API_KEYS", f"{KEY}, {OTHER}")
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\n" + "z" * 20 + "\n\n")
    assert load_api_keys(str(keys_file)) == [KEY, OTHER, "z" * 20]
    monkeypatch.setenv("BINARYLM_API_KEYS", "short")
    with pytest.raises(BinaryLMError, match="shorter than 16"):
        load_api_keys()
    with pytest.raises(BinaryLMError, match="does not exist"):
        load_api_keys(str(tmp_path / "missing"))
    assert authorized_key(f"Bearer {KEY}", [KEY]) == KEY and authorized_key(KEY, [KEY]) is None


def test_token_buckets_refill_at_capacity_per_minute():
    now = [0.0]
    buckets = TokenBuckets(60, clock=lambda: now[0])
    assert buckets.take("a", 60) == 0 and buckets.take("a", 1) == pytest.approx(1.0)
    now[0] = 2.0
    assert buckets.take("a", 2) == 0 and buckets.take("b", 60) == 0  # refilled 2; b has its own bucket
    assert buckets.take("a", 61) == float("inf")


def test_health_is_503_while_the_model_loads_and_200_after():
    import threading

    from fastapi import FastAPI

    from binarylm.serve.loading import LoadingApp

    release = threading.Event()
    ready = FastAPI()
    ready.get("/health")(lambda: {"status": "ok"})
    gate = LoadingApp(lambda: (release.wait(10), ready)[1])
    client = TestClient(gate)
    loading = client.get("/health")
    assert loading.status_code == 503 and loading.json()["error"]["message"] == "the model is loading"
    release.set()
    assert gate.wait(10) and client.get("/health").status_code == 200
    broken = TestClient(LoadingApp(lambda: 1 / 0))
    broken.app.wait(10)
    assert "failed to load (ZeroDivisionError" in broken.get("/v1/models").json()["error"]["message"]


def test_a_streaming_client_that_disconnects_frees_its_slot(small_tokenizer):
    import asyncio

    from binarylm.serve.app import CompletionJob
    from binarylm.serve.protocol import CompletionRequest

    client, runner = client_with(small_tokenizer)

    class StillThere:
        async def is_disconnected(self) -> bool:
            return False

    async def stream_then_leave():
        job = CompletionJob(runner, small_tokenizer, "tiny",
                            CompletionRequest(prompt="x", max_tokens=60, stream=True, ignore_eos=True))
        job.submit(asyncio.get_running_loop())
        chunks = job.stream(StillThere())
        first = await chunks.__anext__()
        await chunks.aclose()  # what the server does to the response generator when the client disconnects
        return first

    try:
        assert asyncio.run(stream_then_leave()).startswith("data: ")
        for _ in range(100):
            if not runner.engine.has_work():
                break
            asyncio.run(asyncio.sleep(0.05))
        assert not runner.engine.has_work()  # aborted: slot freed long before 60 tokens
    finally:
        runner.stop()
