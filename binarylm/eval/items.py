"""What an evaluation task is made of, whatever file it came from.

Readers (eval/formats.py for the standard benchmarks, eval/custom.py for YAML-described tasks)
turn rows into these items; the evaluators (eval/tasks.py) score them and never look at the
original schema. Two kinds cover every task here:

    ChoiceItem      multiple choice by log-likelihood: each option is a (context, continuation)
                    pair, and the option whose continuation is likeliest is the model's answer.
                    Most benchmarks share one context ("Question: ... Answer:") across options
                    with different continuations; Winogrande's options differ in the context
                    (the blank filled in) and share the continuation (the rest of the sentence).
    GenerationItem  the model writes an answer after a prompt, and a checker compares what it
                    extracts from the text with the reference.

`source` is "file, line N" (or "file, row N" for parquet), so a failure points back to its data.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: options[i] = (context, continuation); options[gold] is right."""

    source: str
    options: tuple[tuple[str, str], ...]
    gold: int
    few_shot_text: str = ""  # this item written as a solved example, for other items' few-shot prompts
    preamble: str = ""  # said once before any solved examples and the question (MMLU's "about {subject}" line)

    def __post_init__(self) -> None:
        if len(self.options) < 2 or not 0 <= self.gold < len(self.options):
            raise ValueError(f"{self.source}: needs at least two options and a gold index among them, "
                             f"got {len(self.options)} options and gold={self.gold}")


@dataclass(frozen=True)
class GenerationItem:
    """One open question: the model continues `prompt`; `answer` is the reference the checker compares to."""

    source: str
    prompt: str
    answer: str
    stop: tuple[str, ...] = ("\n\n",)
    few_shot_text: str = ""
    metadata: dict = field(default_factory=dict, compare=False)
