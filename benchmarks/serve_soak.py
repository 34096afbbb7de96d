"""Soak test of the server: many concurrent streaming clients for a while, some hanging up midway.

`binarylm serve` runs in its own process. C clients loop for --seconds: each sends a streaming
completion; every fourth request hangs up after a few chunks (a client going away). At the end:

- failed requests (a status other than 200, a transport error, or a finished stream without
  `data: [DONE]`) must be 0;
- the server's memory (resident set, from /proc) is sampled every second: the last third of the
  run must not sit higher than the first third by more than --memory-slack MiB;
- once the clients stop, /metrics must show no running or waiting request (no stuck slots).

    python benchmarks/serve_soak.py [--checkpoint runs/bench-small] [--clients 32] [--seconds 60]

The last line printed is JSON with every figure; the exit status is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
from serve_load import start_server  # benchmarks/serve_load.py (scripts run from benchmarks/)


async def client(http: httpx.AsyncClient, number: int, deadline: float, tally: dict) -> None:
    sent = 0
    while time.perf_counter() < deadline:
        hang_up = sent % 4 == 3
        body = {"prompt": f"def f{number}_{sent}(", "max_tokens": 48, "temperature": 0.8, "seed": number * 1000 + sent,
                "stream": True}
        sent += 1
        try:
            async with http.stream("POST", "/completions", json=body) as reply:
                if reply.status_code != 200:
                    tally["failed"] += 1
                    continue
                lines = 0
                done = False
                async for line in reply.aiter_lines():
                    lines += line.startswith("data: ")
                    done = done or line == "data: [DONE]"
                    if hang_up and lines == 3:
                        break
                if hang_up:
                    tally["hung_up"] += 1
                elif done:
                    tally["completed"] += 1
                else:
                    tally["failed"] += 1
        except httpx.HTTPError:
            tally["failed"] += 1


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def soak(port: int, pid: int, args) -> dict:
    tally = {"completed": 0, "hung_up": 0, "failed": 0}
    memory: list[float] = []
    deadline = time.perf_counter() + args.seconds

    async def sample_memory() -> None:
        while time.perf_counter() < deadline:
            memory.append(resident_mib(pid))
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1", timeout=120) as http:
        await asyncio.gather(sample_memory(), *(client(http, c, deadline, tally) for c in range(args.clients)))
        await asyncio.sleep(1.0)  # let the server apply the last aborts
        metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    third = max(1, len(memory) // 3)
    gauges = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith(("binarylm_requests_running", "binarylm_requests_waiting"))}
    return {**tally, "memory_first_third_mib": statistics.median(memory[:third]),
            "memory_last_third_mib": statistics.median(memory[-third:]), "stuck": gauges}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/bench-small")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-slack", type=float, default=20.0, help="MiB the server may grow by")
    args = parser.parse_args()
    server, port = start_server(argparse.Namespace(checkpoint=args.checkpoint, clients=args.clients,
                                                   threads=args.threads))
    try:
        result = asyncio.run(soak(port, server.pid, args))
    finally:
        server.terminate()
        server.wait(60)
    grew = result["memory_last_third_mib"] - result["memory_first_third_mib"]
    checks = {"no_failures": result["failed"] == 0, "memory_flat": grew <= args.memory_slack,
              "no_stuck_slots": all(value == 0 for value in result["stuck"].values())}
    print(f"{args.clients} clients for {args.seconds:.0f} s: {result['completed']} streams completed with [DONE], "
          f"{result['hung_up']} hung up midway, {result['failed']} failed; server memory "
          f"{result['memory_first_third_mib']:.0f} -> {result['memory_last_third_mib']:.0f} MiB; "
          f"after the clients stopped: {result['stuck']}")
    print(json.dumps({**result, "memory_growth_mib": grew, "checks": checks}))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
