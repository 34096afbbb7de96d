"""What keeps a server safe to expose: API keys, rate limits, size caps.

- API keys: `Authorization: Bearer KEY`, compared with `hmac.compare_digest` (constant time,
  so response timing does not reveal how much of a guess was right). Keys come from the
  BINARYLM_API_KEYS environment variable (comma-separated) and/or a key file (one per line).
  With no keys configured the server is open, which `binarylm serve` only allows on localhost
  unless told otherwise. Health and metrics stay public unless configured otherwise.
- Rate limits: one token bucket per key (per client address when there are no keys) for
  requests per minute, and one for tokens per minute (prompt + max_tokens x n, charged when the
  request arrives). A bucket of capacity C refills at C / 60 per second; an empty one answers
  429 with a Retry-After header.
- Size caps: a request body over `max_body_bytes` is refused with 413, before it is read when its
  Content-Length says so, and as soon as it passes the cap when it comes chunked with none; the
  engine's own check refuses a prompt plus max_tokens beyond the context (400), and a full
  waiting queue answers 429.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from binarylm.errors import BinaryLMError

KEYS_VARIABLE = "BINARYLM_API_KEYS"


@dataclass
class ServerSettings:
    api_keys: list[str] = field(default_factory=list)
    public_paths: tuple[str, ...] = ("/health", "/metrics")
    max_body_bytes: int = 1 << 20
    max_waiting: int = 256  # requests queued for a slot before new ones get 429
    requests_per_minute: int = 0  # per key (or client address); 0 means unlimited
    tokens_per_minute: int = 0
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all


def load_api_keys(key_file: str | None = None) -> list[str]:
    """Keys from BINARYLM_API_KEYS and the key file; blank lines and '#' comments are skipped."""
    keys = [k.strip() for k in os.environ.get(KEYS_VARIABLE, "").split(",") if k.strip()]
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise BinaryLMError(f"API key file {path} does not exist; give a file with one key per line")
        keys += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    short = [k for k in keys if len(k) < 16]
    if short:
        raise BinaryLMError(f"{len(short)} API key(s) are shorter than 16 characters; use long random keys "
                            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return keys


def authorized_key(header: str | None, keys: list[str]) -> str | None:
    """The key a `Bearer` header carries if it is one of `keys` (compared in constant time), else None."""
    if not header or not header.startswith("Bearer "):
        return None
    offered = header[len("Bearer "):].strip().encode()
    match = None
    for key in keys:  # every key is compared, so timing does not tell which one came close
        if hmac.compare_digest(offered, key.encode()):
            match = key
    return match


class TokenBuckets:
    """Per-identity token buckets of `capacity` per minute; thread-safe."""

    def __init__(self, capacity: int, clock=time.monotonic):
        self.capacity, self.clock = capacity, clock
        self._levels: dict[str, tuple[float, float]] = {}  # identity -> (tokens left, when)
        self._lock = threading.Lock()

    def take(self, identity: str, amount: float = 1.0) -> float:
        """0 if `amount` was taken from the bucket; otherwise the seconds until it will be there."""
        if self.capacity <= 0:
            return 0.0
        rate = self.capacity / 60.0
        with self._lock:
            now = self.clock()
            left, then = self._levels.get(identity, (float(self.capacity), now))
            left = min(self.capacity, left + (now - then) * rate)
            if amount > self.capacity:
                self._levels[identity] = (left, now)
                return float("inf")
            if left >= amount:
                self._levels[identity] = (left - amount, now)
                return 0.0
            self._levels[identity] = (left, now)
            return (amount - left) / rate
