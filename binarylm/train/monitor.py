"""What a run reports while it trains: a progress bar, metrics.jsonl and TensorBoard events.

Only the main process (rank 0) reports; the others stay quiet.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from binarylm.errors import BinaryLMError
from binarylm.train.tensorboard import EventWriter

log = logging.getLogger(__name__)


class Monitor:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True, progress: bool = True,
                 desc: str = "pretrain"):
        self.enabled = enabled
        self.started = time.perf_counter()
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")
        self._events = EventWriter(run_dir / "tensorboard")
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                         disable=not progress, dynamic_ncols=True)

    def log(self, step: int, split: str, values: dict[str, Any]) -> None:
        """Record `values` for `step` under `split` ("train" or "val")."""
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.perf_counter() - self.started, 3), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        numbers = {f"{split}/{k}": v for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)}
        self._events.add_scalars(step, numbers)

    def advance(self, steps: int, loss: float, tokens_per_sec: float | None = None) -> None:
        if self.enabled:
            self._bar.update(steps)
            speed = {} if tokens_per_sec is None else {"tok_s": f"{tokens_per_sec:,.0f}"}
            self._bar.set_postfix(loss=f"{loss:.3f}", **speed)

    def message(self, text: str) -> None:
        if self.enabled:
            self._bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._jsonl.close()
            self._events.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of a run's metrics.jsonl; a last line cut short (a run killed mid-write) is left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):  # damage before the end is not a torn write: say so
                raise BinaryLMError(f"{path}, line {number}: malformed JSON ({error.msg}); fix or remove the "
                                    "line") from None
            log.warning("%s: the last line is cut short (a run stopped while writing it); leaving it out", path)
    return records
