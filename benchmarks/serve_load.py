"""Load generator for the server: latency percentiles and throughput, by concurrency or by request rate.

A real server (`binarylm serve` in its own process, on a free local port) serves a checkpoint, unless
--url names one already running. Streaming completion requests are sent

- by concurrency: C clients, each sending its next request as soon as the last one ends, or
- by rate: requests arriving as a Poisson process of R requests per second (--rate),

until every client has sent --requests requests (concurrency) or --duration seconds have passed.
For each request the client records when it was sent, when each token's chunk arrived and whether
it failed (a status other than 200, a transport error, an in-band error chunk, or no `data: [DONE]`).
Reported per run: time to first token (TTFT), time per output token after the first (TPOT),
inter-token latency (ITL, every gap between chunks) and end-to-end latency, each at p50/p90/p99;
requests and generated tokens per second; errors; the load generator's own CPU seconds (on a
small machine it shares the cores with the server); and, for a server it started, the CPU seconds of
the server's event loop and of its other (engine) threads.

Without --rate or --duration the default run is the serving issue's comparison: one client, then
--clients concurrent clients, then the same requests through `Engine.generate` with no HTTP; it
prints C clients / one client and server / engine alone.

The client is a small HTTP/1.1 reader over asyncio streams (`--client raw`, the default: it reads the
chunked body and splits server-sent events itself) or httpx (`--client httpx`).

    python benchmarks/serve_load.py [--checkpoint runs/bench-small] [--clients 32] [--requests 4]
                                    [--max-tokens 64] [--threads 2] [--client raw|httpx]
    python benchmarks/serve_load.py --rate 20 --duration 30 [--url http://host:8000] [--api-key KEY]
    python benchmarks/serve_load.py --clients 8 --duration 60

The last line printed is JSON with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import torch

from binarylm.checkpoint import load_checkpoint
from binarylm.infer.engine import Engine
from binarylm.infer.sampling import SamplingParams

PROMPTS = ("def ", "import os\n", "class Parser:\n    def ", "    for i in range(", "# Copyright", "return ")


# ------------------------------------------------------------------ the server


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
    log = tempfile.TemporaryFile()  # the server's stderr: shown if it fails to start, never a full pipe
    server = subprocess.Popen(command, stderr=log, env=environment)
    for _ in range(600):
        if server.poll() is not None:
            log.seek(0)
            said = log.read().decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"the server exited with status {server.returncode}: " + " / ".join(said))
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server, port
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.kill()
    raise RuntimeError("the server did not become healthy within 60 s")


# ------------------------------------------------------------------ one request


@dataclass
class Record:
    """One request as its client saw it (times from time.perf_counter)."""

    sent: float
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk carrying generated text
    ended: float = 0.0
    error: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_times)


class Target:
    """Where requests go and how: host, port, path prefix, API key, and the client implementation."""

    def __init__(self, url: str, api_key: str | None, client: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.base = parts.path.rstrip("/")
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.client = client
        self.http = httpx.AsyncClient(base_url=url, timeout=600, headers=self.headers) if client == "httpx" else None

    async def send(self, body: dict) -> Record:
        record = Record(time.perf_counter())
        done = False
        try:
            events = self._raw_events(body) if self.http is None else self._httpx_events(body)
            async for data in events:
                done = done or self._take(data, record)
        except (OSError, ValueError, httpx.HTTPError, RuntimeError) as error:  # ValueError: a garbled reply
            record.error = f"{type(error).__name__}: {error}"
        record.ended = time.perf_counter()
        if record.error is None and not done:
            record.error = "the stream ended without data: [DONE]"
        return record

    @staticmethod
    def _take(data: str, record: Record) -> bool:
        """Count one event's generated text; True at `[DONE]`. An in-band error marks the record failed."""
        if data == "[DONE]":
            return True
        chunk = json.loads(data)
        if "error" in chunk:
            record.error = chunk["error"].get("message", "error chunk")
        elif any(c.get("text") or c.get("finish_reason") is None for c in chunk.get("choices", ())):
            record.token_times.append(time.perf_counter())  # a token (its text may wait for the next one)
        return False

    async def _httpx_events(self, body: dict):
        async with self.http.stream("POST", "/completions", json=body) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"status {reply.status_code}")
            async for line in reply.aiter_lines():
                if line.startswith("data: "):
                    yield line[6:]

    async def _raw_events(self, body: dict):
        """POST over a fresh connection; yield the data of each server-sent event from the chunked body."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            payload = json.dumps(body).encode()
            head = [f"POST {self.base}/completions HTTP/1.1", f"host: {self.host}:{self.port}",
                    f"content-length: {len(payload)}", "connection: close",
                    *(f"{name}: {value}" for name, value in self.headers.items())]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
            status = (await reader.readline()).split(b" ", 2)
            if len(status) < 2 or status[1] != b"200":
                raise RuntimeError(f"status {status[1].decode() if len(status) > 1 else '?'}")
            headers = []
            while (line := await reader.readline()) not in (b"\r\n", b""):
                headers.append(line.lower())
            chunked = any(h.startswith(b"transfer-encoding:") and b"chunked" in h for h in headers)
            pending = b""
            async for piece in (_chunks(reader) if chunked else _until_closed(reader)):
                pending += piece
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: "):
                        yield event[6:].decode()
        finally:
            writer.close()


async def _chunks(reader: asyncio.StreamReader):
    """The pieces of a chunked transfer-encoded body: hex size line, data, CRLF; a size of 0 ends it."""
    while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def _until_closed(reader: asyncio.StreamReader):
    """A body sent without chunking (through a buffering proxy, say): read until the server closes."""
    while piece := await reader.read(65536):
        yield piece


def request_body(number: int, args) -> dict:
    return {"prompt": PROMPTS[number % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}


# ------------------------------------------------------------------ load patterns


async def by_concurrency(target: Target, clients: int, args) -> list[Record]:
    """`clients` loops, each sending its next request when the last ends, for --requests each or --duration."""
    deadline = time.perf_counter() + args.duration if args.duration else None

    async def client(number: int) -> list[Record]:
        records = []
        for sent in range(10**9 if deadline else args.requests):
            if deadline and time.perf_counter() >= deadline:
                break
            records.append(await target.send(request_body(number + sent, args)))
        return records

    return [r for records in await asyncio.gather(*(client(c) for c in range(clients))) for r in records]


async def by_rate(target: Target, args) -> list[Record]:
    """Requests arriving as a Poisson process of --rate per second, for --duration seconds."""
    arrivals, tasks = random.Random(args.seed), []
    deadline = time.perf_counter() + args.duration
    number = 0
    while time.perf_counter() < deadline:
        tasks.append(asyncio.create_task(target.send(request_body(number, args))))
        number += 1
        await asyncio.sleep(arrivals.expovariate(args.rate))
    return list(await asyncio.gather(*tasks))


async def run_load(target: Target, args, clients: int | None) -> tuple[list[Record], float, float]:
    """(records, wall seconds, the load generator's CPU seconds) of one run."""
    started, cpu = time.perf_counter(), time.process_time()
    try:
        records = await (by_rate(target, args) if clients is None else by_concurrency(target, clients, args))
    finally:
        if target.http is not None:
            await target.http.aclose()
    return records, time.perf_counter() - started, time.process_time() - cpu


# ------------------------------------------------------------------ figures


def percentiles(values: list[float]) -> dict:
    """p50, p90, p99 in milliseconds (nearest rank), or None where there is nothing to rank."""
    ranked = sorted(values)

    def at(q: float) -> float | None:
        return 1000 * ranked[max(0, math.ceil(q * len(ranked)) - 1)] if ranked else None  # the ceil(q n)-th

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99)}


def summary(records: list[Record], seconds: float, cpu: float) -> dict:
    good = [r for r in records if r.error is None]
    generated = sum(r.tokens for r in good)
    ttft = [r.token_times[0] - r.sent for r in good if r.tokens]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (r.tokens - 1) for r in good if r.tokens > 1]
    itl = [later - earlier for r in good for earlier, later in zip(r.token_times, r.token_times[1:])]
    return {"requests": len(records), "errors": len(records) - len(good), "tokens": generated,
            "error_examples": sorted({r.error for r in records if r.error})[:3],
            "seconds": seconds, "requests_per_s": len(good) / seconds, "tokens_per_s": generated / seconds,
            "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot), "itl_ms": percentiles(itl),
            "e2e_ms": percentiles([r.ended - r.sent for r in good]), "load_generator_cpu_s": cpu}


def describe(name: str, figures: dict) -> str:
    def trio(key: str) -> str:
        values = figures[key]
        return "/".join("-" if values[q] is None else f"{values[q]:.0f}" for q in ("p50", "p90", "p99"))

    return (f"{name}: {figures['tokens']} tokens, {figures['tokens_per_s']:.1f} tok/s, "
            f"{figures['requests_per_s']:.2f} req/s, "
            f"{figures['errors']} errors of {figures['requests']}; ms p50/p90/p99: TTFT {trio('ttft_ms')}, "
            f"TPOT {trio('tpot_ms')}, ITL {trio('itl_ms')}, end-to-end {trio('e2e_ms')}; "
            f"load generator CPU {figures['load_generator_cpu_s']:.2f} s in {figures['seconds']:.2f} s"
            + ("; server CPU: event loop {event_loop:.2f} s, other threads {other_threads:.2f} s".format(
                **figures["server_cpu_s"]) if "server_cpu_s" in figures else ""))


def direct(saved, args) -> float:
    """Generated tokens per second of the comparison's requests through Engine.generate, no HTTP."""
    prompts = [saved.tokenizer.encode(request_body(c + n, args)["prompt"])
               for c in range(args.clients) for n in range(args.requests)]
    engine = Engine(saved.model, saved.tokenizer, max_batch=args.clients)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    started = time.perf_counter()
    done = engine.generate(prompts, params)
    return sum(len(c.samples[0].token_ids) for c in done) / (time.perf_counter() - started)


# ------------------------------------------------------------------ the run


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid`, by thread id, from /proc; {} elsewhere."""
    seconds = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            fields = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return {}
    return seconds


def measure(args, url: str, server_pid: int | None = None) -> dict:
    def run(clients: int | None) -> dict:
        before = thread_cpu_seconds(server_pid) if server_pid else {}
        figures = summary(*asyncio.run(run_load(Target(url, args.api_key, args.client), args, clients)))
        if before:  # the server's main thread runs its event loop; the others are the engine's
            spent = {tid: cpu - before.get(tid, 0.0) for tid, cpu in thread_cpu_seconds(server_pid).items()}
            figures["server_cpu_s"] = {"event_loop": spent.pop(server_pid, 0.0), "other_threads": sum(spent.values())}
        return figures

    if args.rate or args.duration:
        name = f"{args.rate} requests/s" if args.rate else f"{args.clients} concurrent clients"
        figures = run(None if args.rate else args.clients)
        print(describe(name, figures))
        return {"load": figures}
    single, many = run(1), run(args.clients)
    print(describe("1 streaming client", single))
    print(describe(f"{args.clients} concurrent streaming clients", many))
    return {"single": single, "concurrent": many}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/bench-small")
    parser.add_argument("--url", help="a running server's base URL (e.g. http://127.0.0.1:8000/v1); "
                                      "default: start one for --checkpoint")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--rate", type=float, help="requests per second (Poisson arrivals) instead of clients")
    parser.add_argument("--duration", type=float, help="seconds to send requests for (needed with --rate)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    parser.add_argument("--seed", type=int, default=0, help="for the arrival times of --rate")
    args = parser.parse_args()
    if args.rate is not None and (args.rate <= 0 or not args.duration):
        parser.error("--rate needs a positive rate and --duration SECONDS")
    torch.set_num_threads(args.threads)
    server = None
    if args.url is None:
        try:
            server, port = start_server(args)
        except RuntimeError as error:
            sys.exit(f"serve_load.py: {error}")
    try:
        figures = measure(args, args.url or f"http://127.0.0.1:{port}/v1", server.pid if server else None)
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    result = {"clients": args.clients, "requests": args.requests, "rate": args.rate, "duration": args.duration,
              "max_tokens": args.max_tokens, "client": args.client, **figures}
    if "concurrent" in figures:
        single, many = figures["single"]["tokens_per_s"], figures["concurrent"]["tokens_per_s"]
        engine_rate = direct(load_checkpoint(args.checkpoint), args)
        print(f"{args.clients} clients vs 1: {many / single:.2f}x one client's tokens/s; engine alone "
              f"{engine_rate:.1f} tok/s -> server/engine {many / engine_rate:.2f}x")
        result.update(engine_tokens_per_s=engine_rate, vs_single_client=many / single, vs_engine=many / engine_rate)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
