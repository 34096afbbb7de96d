"""Task evaluators: multiple choice by log-likelihood, open answers by generation, and the built-in tasks.

They take items (eval/items.py), never raw files, and return a `TaskResult`: a few headline
numbers plus one record per example, so that every number can be traced to the examples
behind it (eval/analysis.py reads those records).

Multiple choice: accuracy and length-normalised accuracy
    Each option is a (context, continuation) pair; the model's answer is the option whose
    continuation it finds likeliest, log p(continuation | context) summed over its tokens
    (eval/scoring.py). That sum is `acc`. A sum of log-probs only falls as the text grows,
    so a long right answer can lose to a short wrong one just for being long. `acc_norm`
    divides each option's log-prob by its length in UTF-8 bytes first, a per-byte score; bytes
    rather than tokens, so that two tokenizers are judged on the same yardstick. Neither is
    always better: report both, and `chance` (the accuracy of guessing) beside them.

Few-shot prompting
    A small or base model often does not know what format is wanted. `few_shot` solved
    examples (each item's `few_shot_text`, e.g. "Question: ...\\nAnswer: B") are put before the
    prompt, separated by blank lines, and the model continues the pattern. They are drawn from
    `pool` (a train split) or, without one, from the other evaluated items, reproducibly: the
    same seed gives every item the same examples in every run. They eat context: with a short
    context the oldest tokens are dropped first (scoring) or the prompt is cut from the left
    (generation), and the generation records say when that happened.

Answer extraction
    A generated answer is free text ("She has 3 + 4 = 7 apples.\\n#### 7"); exact match needs
    the answer alone. `extract_answer` takes it with a task's regex (its first group), or,
    GSM8K-style, the number after "####", else the last number in the text. An output with no
    answer in it counts as wrong, and the share of outputs with one (`extracted`) is reported:
    a low share says the model missed the format, not the question.

    result = evaluate_choices(model, tokenizer, items, few_shot=5, pool=train_items)
    result.metrics["acc"], result.metrics["acc_norm"], result.records[0]["margin"]
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from binarylm.data.synthetic import check, make_examples
from binarylm.errors import BinaryLMError
from binarylm.eval.items import ChoiceItem, GenerationItem
from binarylm.eval.scoring import SCORE_BATCH, score_pairs
from binarylm.infer.engine import Engine
from binarylm.infer.sampling import SamplingParams
from binarylm.tokenizer import Tokenizer
from binarylm.train.finetune import generate_answers

Item = TypeVar("Item", ChoiceItem, GenerationItem)

SHOT_SEPARATOR = "\n\n"
# A number as people write it: "-12", "3.5", "1,234,567"; not starting inside another number ("5-3" gives 3).
NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
GSM8K_ANSWER = re.compile(r"####\s*(" + NUMBER.pattern + ")")


@dataclass
class TaskResult:
    """A task's headline numbers and one record per example (see the evaluators for the record fields)."""

    name: str
    metrics: dict[str, float]
    records: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ few-shot prompts


def draw_shots(items: Sequence[Item], few_shot: int, pool: Sequence[Item] | None = None,
               seed: int = 0) -> list[list[Item]]:
    """For each item, `few_shot` solved examples from `pool` (or from `items`), never the item itself.

    Only candidates with a `few_shot_text` count. Candidates under the item's own preamble (MMLU:
    the same subject, which the prompt names once above the examples) are taken when there are
    enough of them, else any. Item i's examples come from a generator seeded by (seed, i), so they
    do not change when other items are added or removed after it.
    """
    if few_shot < 0:
        raise BinaryLMError(f"few_shot must be 0 or more, got {few_shot}")
    if few_shot == 0:
        return [[] for _ in items]
    candidates = [candidate for candidate in (items if pool is None else pool) if candidate.few_shot_text]
    copies = Counter(candidates)  # an item that is also a candidate (or equal to one) must not be its own example
    by_preamble: dict[str, list[Item]] = {}
    for candidate in candidates:
        by_preamble.setdefault(getattr(candidate, "preamble", ""), []).append(candidate)
    shots = []
    for index, item in enumerate(items):
        same = by_preamble.get(getattr(item, "preamble", ""), [])
        chosen_from = same if getattr(item, "preamble", "") and len(same) - copies[item] >= few_shot else candidates
        available = len(chosen_from) - copies[item]
        if available < few_shot:
            where = "the evaluated items" if pool is None else "the few-shot pool"
            raise BinaryLMError(
                f"few_shot={few_shot} needs {few_shot} solved examples besides {item.source}, but {where} "
                f"offers only {available} (items with a few_shot_text); lower few_shot or give a larger pool")
        drawn = random.Random(f"few-shot:{seed}:{index}").sample(chosen_from, few_shot + copies[item])
        shots.append([candidate for candidate in drawn if candidate != item][:few_shot])
    return shots


def with_shots(shots: Sequence[Item], text: str, preamble: str = "") -> str:
    """The preamble, the solved examples, then `text`, the examples each followed by a blank line."""
    return preamble + SHOT_SEPARATOR.join([*(shot.few_shot_text for shot in shots), text])


# ------------------------------------------------------------------------------------------ multiple choice


def evaluate_choices(model: torch.nn.Module, tokenizer: Tokenizer, items: list[ChoiceItem], few_shot: int = 0,
                     pool: list[ChoiceItem] | None = None, seed: int = 0, batch_size: int = SCORE_BATCH,
                     name: str = "choices") -> TaskResult:
    """Accuracy of picking the likeliest option, by total log-prob (`acc`) and log-prob per byte (`acc_norm`).

    Records: kind "choice", source, options ([context, continuation] as in the item, without the
    few-shot examples), shots (their sources), logprobs (one per option, nats), bytes (each
    continuation's UTF-8 length), prediction and prediction_norm (option indices by acc and
    acc_norm), target (the gold index), correct, correct_norm, and margin (gold's log-prob minus
    the best wrong option's: negative when wrong, small when the model hesitated).
    """
    _check_items(items, name)
    shots = draw_shots(items, few_shot, pool, seed)
    pairs = [(with_shots(item_shots, context, item.preamble), continuation)
             for item, item_shots in zip(items, shots) for context, continuation in item.options]
    scores = iter(score_pairs(model.eval(), tokenizer, pairs, batch_size))  # all options at once: full batches
    records = [_choice_record(item, item_shots, [next(scores).logprob for _ in item.options])
               for item, item_shots in zip(items, shots)]
    metrics = {**_accuracy(records, "correct", "acc"), **_accuracy(records, "correct_norm", "acc_norm"),
               "n": len(records), "chance": sum(1 / len(item.options) for item in items) / len(items)}
    return TaskResult(name, metrics, records)


def _choice_record(item: ChoiceItem, shots: list[ChoiceItem], logprobs: list[float]) -> dict:
    # Per byte, not per token: a total log-prob falls with every extra byte of answer, and bytes are the same
    # for every tokenizer. An empty continuation (possible when the context ends in whitespace) counts as 1.
    lengths = [max(len(continuation.encode("utf-8")), 1) for _, continuation in item.options]
    prediction = _argmax(logprobs)
    prediction_norm = _argmax([logprob / length for logprob, length in zip(logprobs, lengths)])
    best_wrong = max(logprob for index, logprob in enumerate(logprobs) if index != item.gold)
    return {"kind": "choice", "source": item.source, "options": [list(option) for option in item.options],
            "shots": [shot.source for shot in shots], "logprobs": logprobs, "bytes": lengths,
            "prediction": prediction, "prediction_norm": prediction_norm, "target": item.gold,
            "correct": prediction == item.gold, "correct_norm": prediction_norm == item.gold,
            "margin": logprobs[item.gold] - best_wrong}


def _argmax(values: Sequence[float]) -> int:
    """The index of the largest value; the first one on a tie."""
    return max(range(len(values)), key=values.__getitem__)


# ------------------------------------------------------------------------------------------ generation


def extract_answer(text: str, regex: str | re.Pattern | None = None) -> str | None:
    """The answer inside a generated text, or None when there is none.

    With `regex`: group 1 of its first match (the whole match if it has no group), stripped.
    Without: the number after "####" (GSM8K's answer line) if there is one, else the last
    number in the text; thousands commas are dropped ("1,234" -> "1234") and a full stop
    after it is not part of it ("is 42." -> "42").
    """
    if regex is not None:
        match = _compile(regex).search(text)
        if match is None:
            return None
        found = match.group(1) if match.re.groups and match.group(1) is not None else match.group(0)
        return found.strip()
    marked = GSM8K_ANSWER.search(text)
    numbers = [marked.group(1)] if marked else NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _compile(regex: str | re.Pattern) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as error:
        raise BinaryLMError(f"the answer regex {regex!r} is not a valid regular expression ({error}); "
                            r"fix it, e.g. 'answer is (\w+)'") from error


def evaluate_generation(model: torch.nn.Module, tokenizer: Tokenizer, items: list[GenerationItem], few_shot: int = 0,
                        pool: list[GenerationItem] | None = None, seed: int = 0, regex: str | None = None,
                        max_new_tokens: int = 64, batch_size: int = 16, name: str = "generation") -> TaskResult:
    """Exact match of the answer extracted from each greedy continuation (see `extract_answer`).

    Records: kind "generation", source, prompt (the item's, without the few-shot examples),
    shots (their sources), output (the generated text, cut before the item's first stop string),
    extracted and prediction (the answer found, or None), target (the reference), correct, and
    truncated (whether the prompt lost its oldest tokens to fit the context).
    """
    _check_items(items, name)
    if regex is not None:
        _compile(regex)  # a bad regex fails now, not after the generation
    shots = draw_shots(items, few_shot, pool, seed)
    prompts = [with_shots(item_shots, item.prompt) for item, item_shots in zip(items, shots)]
    outputs, truncated = greedy_outputs(model, tokenizer, prompts, [item.stop for item in items], max_new_tokens,
                                        batch_size)
    records = []
    for item, item_shots, output, cut in zip(items, shots, outputs, truncated):
        extracted = extract_answer(output, regex)
        correct = extracted is not None and _normalise(extracted) == _normalise(item.answer)
        records.append(generation_record(item.source, item.prompt, output, extracted, item.answer, correct,
                                         shots=[shot.source for shot in item_shots], truncated=cut))
    return TaskResult(name, exact_match_metrics(records), records)


@torch.no_grad()
def greedy_outputs(model: torch.nn.Module, tokenizer: Tokenizer, prompts: list[str], stops: list[Sequence[str]],
                   max_new_tokens: int, batch_size: int = 16) -> tuple[list[str], list[bool]]:
    """Each prompt's greedy continuation through the shared engine, cut before its first stop string (or at the
    end-of-text token), and whether the prompt had to lose its oldest tokens to leave room for the answer."""
    window = model.config.context_length
    if not 0 < max_new_tokens < window:
        raise BinaryLMError(f"max_new_tokens must be between 1 and {window - 1} (the model's context is {window} "
                            f"tokens and the prompt needs at least one), got {max_new_tokens}")
    room = window - max_new_tokens  # prompt tokens that fit beside the answer
    prompt_ids = [_prompt_ids(tokenizer, prompt) for prompt in prompts]
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop=[text for text in stop if text])
              for stop in stops]
    engine = Engine(model, tokenizer, max_batch=max(1, min(batch_size, len(prompts))))
    completions = engine.generate([ids[-room:] for ids in prompt_ids], params)
    return [completion.samples[0].text for completion in completions], [len(ids) > room for ids in prompt_ids]


def _prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from the end-of-text token, as a new document would."""
    ids = tokenizer.encode_ordinary(prompt)
    if not ids and tokenizer.eot_id is None:
        raise BinaryLMError("an item's prompt is empty and the tokenizer has no end-of-text token to start from; "
                            "give every item a prompt")
    return ids or [tokenizer.eot_id]


def generation_record(source: str, prompt: str, output: str, extracted: str | None, target: str, correct: bool,
                      **extra) -> dict:
    """One generated answer as a record (the fields of `evaluate_generation`, plus any `extra` ones)."""
    return {"kind": "generation", "source": source, "prompt": prompt, "output": output, "extracted": extracted,
            "prediction": extracted, "target": target, "correct": bool(correct), **extra}


def exact_match_metrics(records: list[dict]) -> dict[str, float]:
    """exact_match (with its standard error), n, and extracted: the share of outputs with an answer found."""
    extracted = sum(record["extracted"] is not None for record in records) / max(len(records), 1)
    return {**_accuracy(records, "correct", "exact_match"), "n": len(records), "extracted": extracted}


def _normalise(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------ built-in tasks


def evaluate_builtin(model: torch.nn.Module, tokenizer: Tokenizer, tasks: list[str], n_per_task: int, seed: int = 0,
                     max_new_tokens: int = 32, name: str = "builtin") -> TaskResult:
    """Exact match on the held-out ("test") split of the built-in tasks (data/synthetic.py), asked as a chat.

    Metrics: exact_match, exact_match_stderr, n and extracted over all tasks, and exact_match_TASK
    for each. Records are generation records (the whole reply is the answer, judged by
    `synthetic.check`), with `task` added; source is "builtin:TASK:test:INDEX".
    """
    if not tasks or n_per_task < 1:
        raise BinaryLMError(f"evaluate_builtin needs at least one task and n_per_task >= 1, got tasks={tasks!r} and "
                            f"n_per_task={n_per_task}")
    examples = {task: make_examples(task, n_per_task, split="test", seed=seed) for task in tasks}
    flat = [(task, index, example) for task, listed in examples.items() for index, example in enumerate(listed)]
    replies = generate_answers(model, tokenizer, [example.prompt for _, _, example in flat], max_new_tokens)
    records = [generation_record(f"builtin:{task}:test:{index}", example.prompt, reply, reply or None,
                                 example.answer, check(task, reply, example.answer), task=task)
               for (task, index, example), reply in zip(flat, replies)]
    metrics = exact_match_metrics(records)
    for task in examples:
        metrics[f"exact_match_{task}"] = _share([record for record in records if record["task"] == task], "correct")
    return TaskResult(name, metrics, records)


# ------------------------------------------------------------------------------------------ shared pieces


def _accuracy(records: list[dict], key: str, metric: str) -> dict[str, float]:
    """The share p of records whose `key` is true, as `metric`, and its standard error sqrt(p (1 - p) / (n - 1))
    as `metric`_stderr (the spread of p over resampled test sets; NaN with fewer than two records)."""
    n, p = len(records), _share(records, key)
    stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan
    return {metric: p, f"{metric}_stderr": stderr}


def _share(records: list[dict], key: str) -> float:
    return sum(bool(record[key]) for record in records) / len(records)


def _check_items(items: Sequence, name: str) -> None:
    if not items:
        raise BinaryLMError(f"the task {name!r} has no items to evaluate; check its data file and split")
