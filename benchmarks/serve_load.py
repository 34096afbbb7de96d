"""Server throughput under concurrent load, against one client and against the engine alone, in one run.

A real server (`binarylm serve` in its own process, on a free local port) serves a checkpoint;
C concurrent streaming clients (httpx) each send R completion requests one after another. The
same prompts and settings then run through `Engine.generate` with no HTTP at all. The ratio
server / direct tokens per second is what HTTP, JSON, server-sent events and the thread hand-off
cost; C clients / one client is what continuous batching gains over the wire; time to first token
(p50) is measured at the client.

    python benchmarks/serve_load.py [--checkpoint runs/bench-small] [--clients 32] [--requests 4]
                                    [--max-tokens 64] [--threads 2]

The last line printed is JSON with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
import torch

from binarylm.checkpoint import load_checkpoint
from binarylm.infer.engine import Engine
from binarylm.infer.sampling import SamplingParams

PROMPTS = ("def ", "import os\n", "class Parser:\n    def ", "    for i in range(", "# Copyright", "return ")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, int]:
    """`binarylm serve` in a child process (so the clients here do not share its interpreter lock)."""
    port = free_port()
    command = [sys.executable, "-m", "binarylm.cli", "serve", "-c", args.checkpoint, "--port", str(port),
               "--max-batch", str(args.clients)]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen(command, stderr=subprocess.DEVNULL, env=environment)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server, port
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.kill()
    raise RuntimeError("the server did not become healthy within 60 s")


async def one_client(http: httpx.AsyncClient, client: int, args, first_tokens: list[float]) -> int:
    generated = 0
    for number in range(args.requests):
        body = {"prompt": PROMPTS[(client + number) % len(PROMPTS)], "max_tokens": args.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}
        started = time.perf_counter()
        first = None
        async with http.stream("POST", "/completions", json=body) as reply:
            reply.raise_for_status()
            async for line in reply.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - started
                generated += sum(1 for choice in chunk["choices"] if choice["finish_reason"] is None)
        first_tokens.append(first or 0.0)
    return generated


async def load(port: int, args, clients: int) -> tuple[float, float]:
    first_tokens: list[float] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1", timeout=600) as http:
        started = time.perf_counter()
        counts = await asyncio.gather(*(one_client(http, c, args, first_tokens) for c in range(clients)))
        seconds = time.perf_counter() - started
    return sum(counts) / seconds, statistics.median(first_tokens)


def direct(saved, args) -> float:
    prompts = [saved.tokenizer.encode(PROMPTS[(c + n) % len(PROMPTS)])
               for c in range(args.clients) for n in range(args.requests)]
    engine = Engine(saved.model, saved.tokenizer, max_batch=args.clients)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    started = time.perf_counter()
    done = engine.generate(prompts, params)
    return sum(len(c.samples[0].token_ids) for c in done) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/bench-small")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    server, port = start_server(args)
    try:
        single, single_first = asyncio.run(load(port, args, 1))
        served, first_token = asyncio.run(load(port, args, args.clients))
    finally:
        server.terminate()
        server.wait(60)
    engine_rate = direct(load_checkpoint(args.checkpoint), args)
    print(f"1 streaming client x {args.requests} requests x {args.max_tokens} tokens: {single:.1f} tok/s, "
          f"p50 time to first token {1000 * single_first:.0f} ms")
    print(f"{args.clients} concurrent streaming clients: server {served:.1f} tok/s ({served / single:.2f}x one "
          f"client), engine alone {engine_rate:.1f} tok/s -> server/engine {served / engine_rate:.2f}x; "
          f"p50 time to first token {1000 * first_token:.0f} ms")
    print(json.dumps({"clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
                      "single_client_tokens_per_s": single, "server_tokens_per_s": served,
                      "engine_tokens_per_s": engine_rate, "vs_single_client": served / single,
                      "vs_engine": served / engine_rate, "p50_ttft_ms": 1000 * first_token,
                      "single_p50_ttft_ms": 1000 * single_first}))


if __name__ == "__main__":
    main()
