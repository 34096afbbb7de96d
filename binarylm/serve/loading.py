"""Serving before the model is ready: answer 503 while a checkpoint loads, then hand over.

A big checkpoint takes a while to read. Binding the port first and answering
"503, loading" meanwhile lets a load balancer or an orchestrator tell "starting"
from "dead" (GET /health is 503, then 200). `LoadingApp` is a plain ASGI app that
runs `load()` in a background thread and forwards every request to the app it
returns once it exists; if loading fails, every request gets a 503 naming the error.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable


class LoadingApp:
    def __init__(self, load: Callable[[], Callable]):
        self._app: Callable | None = None
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._load, args=(load,), name="binarylm-load", daemon=True)
        self._thread.start()

    def _load(self, load: Callable[[], Callable]) -> None:
        try:
            self._app = load()
        except Exception as error:  # reported to every caller, and in the server's log, not lost in a thread
            self._failure = f"{type(error).__name__}: {error}"
            logging.getLogger(__name__).error("the model failed to load: %s", self._failure)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading ends; True if the app is ready."""
        self._thread.join(timeout)
        return self._app is not None

    async def __call__(self, scope, receive, send) -> None:
        if self._app is not None:
            await self._app(scope, receive, send)
        elif scope["type"] == "http":
            message = f"the model failed to load ({self._failure})" if self._failure else "the model is loading"
            body = json.dumps({"error": {"message": message, "type": "service_unavailable", "param": None,
                                         "code": None}}).encode()
            headers = [(b"content-type", b"application/json"), (b"retry-after", b"5")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
