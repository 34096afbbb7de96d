"""Error analysis: what a task's records (eval/tasks.py) say beyond the headline number.

An accuracy says how often the model is right, not how it is wrong. Three views help:

- the records themselves, one JSON line per example (`save_records`), to read or to diff
  between two checkpoints;
- the worst examples (`worst_examples`): for multiple choice the most confidently wrong
  (the most negative margin: the gold option's log-prob minus the best wrong one's), for
  generation the answers furthest from usable (see `worst_examples` for the order);
- a few failure categories (`failure_categories`) that point at a cause: a model that is
  often "wrong by a narrow margin" is close, one whose answers "normalisation would fix"
  is penalised for length, one with "no answer extracted" did not follow the format.

`analysis_markdown` puts the three into a short section for a report card.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter

from binarylm.eval.tasks import NUMBER, TaskResult
from binarylm.files import write_atomically

NARROW_MARGIN = 1.0  # nats: a wrong answer this close to the gold one is a near miss
CELL_WIDTH = 60  # characters of text shown per table cell

# Choices
RIGHT = "right"
NORMALISATION_FIXES = "wrong, normalisation would fix it"
NARROW = "wrong by a narrow margin (< 1 nat)"
CONFIDENT = "confidently wrong"
# Generation
NO_ANSWER = "no answer extracted"
OFF_BY_ONE = "wrong number, off by one"
WRONG_NUMBER = "wrong number"
WRONG_TEXT = "wrong text"
GENERATION_ORDER = (NO_ANSWER, WRONG_TEXT, WRONG_NUMBER, OFF_BY_ONE)  # worst first


def save_records(result: TaskResult, path: str | os.PathLike) -> None:
    """The result's records as JSONL, one example per line, written atomically."""
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in result.records]
    write_atomically(path, "".join(lines).encode("utf-8"))


def load_records(path: str | os.PathLike) -> list[dict]:
    """Records written by `save_records`."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ------------------------------------------------------------------------------------------ categories


def category(record: dict) -> str:
    """The failure category of one record (see `failure_categories`)."""
    if record["correct"]:
        return RIGHT
    if record["kind"] == "choice":
        return _choice_category(record)
    return _generation_category(record)


def _choice_category(record: dict) -> str:
    if record["correct_norm"]:
        return NORMALISATION_FIXES
    return NARROW if record["margin"] > -NARROW_MARGIN else CONFIDENT


def _generation_category(record: dict) -> str:
    if record["extracted"] is None:
        return NO_ANSWER
    distance = _number_distance(record["extracted"], record["target"])
    if distance is None:
        return WRONG_TEXT
    return OFF_BY_ONE if distance == 1 else WRONG_NUMBER


def failure_categories(records: list[dict]) -> dict[str, int]:
    """How many records fall in each category, most frequent first.

    Multiple choice (each record in the first that applies):
      right                              the likeliest option (by total log-prob) is the gold one;
      wrong, normalisation would fix it  wrong by total log-prob, right by log-prob per byte: the
                                         gold answer is longer and lost on length alone;
      wrong by a narrow margin (< 1 nat) the gold option is less than e times less likely than the
                                         chosen one: a near miss;
      confidently wrong                  everything else.
    Generation:
      right                              the extracted answer matches the reference;
      no answer extracted                nothing answer-shaped in the output: the format was missed;
      wrong number, off by one           the answer and the reference are numbers one apart;
      wrong number                       numbers further apart;
      wrong text                         an answer that is not a number, or a reference that is not.
    """
    return dict(Counter(category(record) for record in records).most_common())


# ------------------------------------------------------------------------------------------ worst examples


def worst_examples(records: list[dict], k: int) -> list[dict]:
    """The k wrong records that are most wrong, worst first (fewer when fewer are wrong).

    Multiple choice: by margin, most negative first (the model preferred a wrong option by the
    most). Generation, which has no confidence to sort by: no answer extracted first (the output
    is unusable), then wrong text, then wrong numbers furthest from the reference first (relative
    to its size: 100 for 12 is worse than 1300 for 1200), then off-by-one numbers; records keep
    their order within a group. Choices come before generation records in a mixed list.
    """
    wrong = [record for record in records if not record["correct"]]
    return sorted(wrong, key=_wrongness)[:max(k, 0)]


def _wrongness(record: dict) -> tuple[int, float]:
    """A sort key: smaller is worse."""
    if record["kind"] == "choice":
        return 0, record["margin"]
    group = _generation_category(record)
    if group != WRONG_NUMBER:
        return 1 + GENERATION_ORDER.index(group), 0.0
    relative = _number_distance(record["extracted"], record["target"]) / max(abs(_as_number(record["target"])), 1.0)
    return 1 + GENERATION_ORDER.index(group), -relative


def _number_distance(answer: str | None, target: str) -> float | None:
    """|answer - target| when both are plain numbers (thousands commas allowed), else None."""
    values = [_as_number(text) for text in (answer, target)]
    return None if None in values else abs(values[0] - values[1])


def _as_number(text: str | None) -> float | None:
    text = (text or "").strip()
    return float(text.replace(",", "")) if NUMBER.fullmatch(text) else None


# ------------------------------------------------------------------------------------------ markdown


def analysis_markdown(result: TaskResult, k: int = 5) -> str:
    """A markdown section: the metrics, the failure categories, and the k worst examples."""
    lines = [f"### {result.name}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {_number(value)} |" for name, value in result.metrics.items()]
    counts = failure_categories(result.records)
    lines += ["", "| outcome | examples |", "| --- | --- |"]
    lines += [f"| {name} | {count} |" for name, count in counts.items()]
    worst = worst_examples(result.records, k)
    if worst:
        plural = "s" if len(worst) != 1 else ""
        lines += ["", f"Worst {len(worst)} example{plural}:", "", "| source | prediction | target | why |",
                  "| --- | --- | --- | --- |"]
        lines += [_worst_row(record) for record in worst]
    return "\n".join(lines) + "\n"


def _worst_row(record: dict) -> str:
    if record["kind"] == "choice":
        prediction = _option_label(record, record["prediction"])
        target = _option_label(record, record["target"])
        why = f"margin {record['margin']:.2f} nats"
    else:
        prediction = record["extracted"] if record["extracted"] is not None else f"(output: {record['output']})"
        target, why = record["target"], category(record)
    return f"| {_cell(record['source'], keep_end=True)} | {_cell(prediction)} | {_cell(target)} | {why} |"


def _option_label(record: dict, index: int) -> str:
    """What tells option `index` apart: its continuation, or its context's end when all continuations are the
    same (Winogrande fills the blank in the context)."""
    continuations = {continuation for _, continuation in record["options"]}
    context, continuation = record["options"][index]
    return _shorten(context, keep_end=True) if len(continuations) == 1 else continuation


def _cell(text: str, keep_end: bool = False) -> str:
    """`text` on one line, shortened, with the characters markdown tables trip on escaped."""
    return _shorten(re.sub(r"\s*\n\s*", " ⏎ ", str(text)), keep_end).replace("|", "\\|")


def _shorten(text: str, keep_end: bool = False) -> str:
    if len(text) <= CELL_WIDTH:
        return text
    return "…" + text[-(CELL_WIDTH - 1):] if keep_end else text[:CELL_WIDTH - 1] + "…"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return "n/a" if math.isnan(value) else f"{value:.4f}"
