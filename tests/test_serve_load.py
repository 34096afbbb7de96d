"""benchmarks/serve_load.py, the load generator: both of its clients against a real server on loopback."""

import argparse
import asyncio
import sys
from pathlib import Path

import pytest
import torch

from binarylm.config import ModelConfig
from binarylm.infer.engine import Engine
from binarylm.model import Transformer

pytest.importorskip("fastapi")
from binarylm.serve.app import create_app  # noqa: E402
from binarylm.serve.runner import EngineRunner  # noqa: E402
from binarylm.serve.security import ServerSettings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve_load  # noqa: E402


@pytest.fixture(scope="module")
def server_url(small_tokenizer, loopback_server):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=small_tokenizer.vocab_size, context_length=64, n_layer=2, n_head=2, d_model=32)
    runner = EngineRunner(Engine(Transformer(config).eval(), small_tokenizer, max_batch=4)).start()
    settings = ServerSettings(api_keys=["secret"])
    with loopback_server(create_app(runner, small_tokenizer, "tiny", settings)) as base_url:
        yield f"{base_url}/v1"
    runner.stop()


def options(**changes) -> argparse.Namespace:
    return argparse.Namespace(**{"requests": 3, "max_tokens": 9, "duration": None, "rate": None, "seed": 0,
                                 **changes})


@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_each_client_counts_every_token_and_times_every_request(server_url, client):
    target = serve_load.Target(server_url, "secret", client)
    records, seconds, _ = asyncio.run(serve_load.run_load(target, options(), clients=2))
    assert len(records) == 6 and all(r.error is None for r in records)
    assert [r.tokens for r in records] == [9] * 6  # ignore_eos: every request runs to max_tokens
    assert all(r.sent < r.token_times[0] <= r.token_times[-1] <= r.ended for r in records)
    figures = serve_load.summary(records, seconds, 0.0)
    assert figures["tokens"] == 54 and figures["errors"] == 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 < figures[key]["p50"] <= figures[key]["p90"] <= figures[key]["p99"]


def test_refused_and_unreachable_requests_are_counted_as_errors(server_url):
    refused = serve_load.Target(server_url, "wrong key", "raw")
    records, seconds, _ = asyncio.run(serve_load.run_load(refused, options(requests=2), clients=1))
    figures = serve_load.summary(records, seconds, 0.0)
    assert figures["errors"] == 2 and figures["tokens"] == 0 and "status 401" in figures["error_examples"][0]
    nobody = serve_load.Target("http://127.0.0.1:1/v1", None, "raw")
    records, _, _ = asyncio.run(serve_load.run_load(nobody, options(rate=50.0, duration=0.1), clients=None))
    assert records and all("ConnectionRefusedError" in r.error for r in records)


def test_percentiles_are_nearest_rank_in_milliseconds():
    assert serve_load.percentiles([0.001 * i for i in range(1, 101)]) == pytest.approx(
        {"p50": 50.0, "p90": 90.0, "p99": 99.0})
    assert serve_load.percentiles([0.004])["p99"] == pytest.approx(4.0)
    assert serve_load.percentiles([]) == {"p50": None, "p90": None, "p99": None}


def replying_with(raw: bytes):
    """A one-shot HTTP server on a free loopback port that answers every request with `raw`, then closes."""
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()
        writer.close()

    return handle


def records_from(raw: bytes) -> list:
    async def run():
        server = await asyncio.start_server(replying_with(raw), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            target = serve_load.Target(f"http://127.0.0.1:{port}/v1", None, "raw")
            return [await target.send({"prompt": "x"})]

    return asyncio.run(run())


def test_the_raw_client_reads_unchunked_streams_and_reports_garbled_ones():
    events = b"".join(b'data: {"choices": [{"text": "%s", "finish_reason": null}]}\n\n' % t for t in (b"a", b"b"))
    plain = records_from(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + events + b"data: [DONE]\n\n")
    assert plain[0].error is None and plain[0].tokens == 2  # no chunking (a buffering proxy): read to the close
    garbled = records_from(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nnot-hex\r\n")
    assert garbled[0].error.startswith("ValueError")
    cut = records_from(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + events)
    assert cut[0].error == "the stream ended without data: [DONE]" and cut[0].tokens == 2
