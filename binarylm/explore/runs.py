"""A run directory as the explorer shows it: its checkpoints, and its loss curves from metrics.jsonl.

Every stage logs through train/monitor.py, one JSON record per line with "step" and "split".
Pretraining logs loss, lr and tokens seen; fine-tuning stages log no token count, some log no
loss at all on the val split (task accuracy instead), and a resumed run logs the steps after its
checkpoint a second time. So every field is optional here: a point without a loss is left out,
a missing token count or learning rate is null, and where a step was logged twice the later
record wins (the resumed run's).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from binarylm.checkpoint import list_checkpoints
from binarylm.errors import BinaryLMError
from binarylm.train.monitor import read_metrics

CURVE_FIELDS = {"train": ("tokens", "loss", "lr"), "val": ("tokens", "loss")}


def checkpoint_names(run_dir: str | Path) -> list[str]:
    """The run's complete checkpoints ("ckpt-000800", ...), oldest first (by step, not by spelling)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BinaryLMError(f"run directory {run_dir} does not exist; give the folder that holds the ckpt-* folders")
    complete = [path.name for path in list_checkpoints(run_dir) if (path / "config.json").is_file()]
    return sorted(complete, key=_step_of)


def training_curves(run_dir: str | Path) -> dict:
    """The reply of GET /v1/explore/curves: {"train": [{"step", "tokens", "loss", "lr"}],
    "val": [{"step", "tokens", "loss"}]}, each sorted by step; empty lists for a run that logged nothing."""
    points: dict[str, dict[int, dict]] = {split: {} for split in CURVE_FIELDS}
    for record in _records(Path(run_dir)):
        split, step = record.get("split"), _number(record.get("step"))
        if split not in CURVE_FIELDS or step is None or _number(record.get("loss")) is None:
            continue
        point = {"step": int(step)} | {name: _number(record.get(name)) for name in CURVE_FIELDS[split]}
        points[split][int(step)] = point  # a later record of the same step replaces the earlier one
    return {split: [by_step[step] for step in sorted(by_step)] for split, by_step in points.items()}


def _records(run_dir: Path) -> list[dict]:
    return [record for record in read_metrics(run_dir) if isinstance(record, dict)]


def _number(value) -> float | None:
    """The value if it is a finite int or float, else None (JSON has no NaN or infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def _step_of(name: str) -> tuple[int, str]:
    digits = re.search(r"\d+", name)
    return (int(digits.group()) if digits else -1, name)
