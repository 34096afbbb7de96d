"""The bridge between asyncio request handlers and the synchronous engine.

One background thread owns the `Engine` and calls `step()` whenever there is
work, sleeping on a condition otherwise. A handler submits a request and gets
an asyncio queue; the engine's callbacks, which run on the engine thread, hand
each Event (and finally the Completion) to that queue with
`loop.call_soon_threadsafe`, so the handler can stream without blocking the
event loop. A handler whose client goes away calls `abort`, which frees the
slot at the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

from binarylm.infer.engine import Completion, Engine, Event
from binarylm.infer.sampling import SamplingParams
from binarylm.serve.observability import RequestTimer, ServerMetrics

logger = logging.getLogger(__name__)


class EngineRunner:
    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="binarylm-engine", daemon=True)
        # Events of the current step, per caller event loop: handed over in one call per loop per step,
        # not one per token, so a busy batch does not wake the event loop dozens of times a step.
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event | Completion]]] = {}

    def start(self) -> EngineRunner:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Let the running requests finish (up to `timeout` seconds), then end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
               queue: asyncio.Queue | None = None) -> tuple[str, asyncio.Queue]:
        """Queue a request; its Events, then its Completion, arrive on `queue` (a new one unless given).

        The request's timings (queue time, time to first token, inter-token latency, end to end) and token
        counts go to `metrics` from the engine thread, which is the one place that sees every step."""
        queue = queue if queue is not None else asyncio.Queue()
        timer = self.metrics.request_started()

        def deliver(item: Event | Completion) -> None:
            if isinstance(item, Event) and item.token_id is not None:
                timer.token()
            self._outbox.setdefault(loop, []).append((queue, item))  # sent once the step ends

        def complete(completion: Completion) -> None:
            self.engine.finished.pop(completion.request_id, None)  # the queue has it; keep nothing behind
            _finish(timer, completion)
            deliver(completion)

        request_id = self.engine.add_request(prompt_ids, params, on_event=deliver, on_complete=complete,
                                             on_admit=timer.admitted)
        with self._wake:
            self._wake.notify()
        return request_id, queue

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        with self._wake:
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self.engine.has_work() and not self._stopping:
                    self._wake.wait(timeout=0.5)
                if self._stopping and not self.engine.has_work():
                    return
            try:
                self.engine.step()
            except Exception:  # never let one bad step kill the thread every request depends on
                logger.exception("engine step failed; aborting the running requests")
                for sequence in list(self.engine.running):
                    self.engine.abort(sequence.request.request_id)
            self._send_outbox()
            self.metrics.set_queue(len(self.engine.running), len(self.engine.waiting))

    def _send_outbox(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that caller's event loop has closed: nobody is listening any more
                pass


def _put_all(items: list[tuple[asyncio.Queue, Event | Completion]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _finish(timer: RequestTimer, completion: Completion) -> None:
    aborted = any(sample.finish_reason == "abort" for sample in completion.samples)
    generated = sum(len(sample.token_ids) for sample in completion.samples)
    timer.finished("aborted" if aborted else "ok", len(completion.prompt_ids), generated)
