"""A built-in suite of small tasks with exact answers: fine-tuning data and a check that needs no download.

Each task family draws short prompts from a seeded generator and knows the one right
answer, a plausible wrong one (for preference data), and how to judge a prediction:

    arithmetic   "What is 17 + 15?"        -> "7+5=12, 1+1+1=3, 32"   (the working, then the result)
    reverse      "Reverse: c a t"          -> "t a c"
    upper        "Upper: c a t"            -> "C A T"
    count        "Count a in: b a n a n a" -> "b0 a1 n1 a2 n2 a3"   (a running tally; the count is last)
    sort         "Sort: 5 3 9"             -> "3 5 9"
    python       "Python: 3 * (2 + 4)"     -> "18"

The word tasks spell their words out, a letter per token, because a small model cannot see
the letters inside a multi-letter BPE token. Train and test are split by a hash of the prompt,
not by the seed, so a test prompt never appears in any training set, whichever seeds made them. Python expressions are
built as small trees whose value is computed alongside their text; nothing is `eval`ed.

    examples = make_examples("reverse", 1000, split="train", seed=0)
    write_messages_jsonl(examples, "reverse.jsonl")        # read back by chat.read_conversations
    check("reverse", " t a  c ", "t a c")                   # True: whitespace is normalised
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from binarylm.errors import BinaryLMError
from binarylm.files import write_atomically

TASKS = ("arithmetic", "reverse", "upper", "count", "sort", "python")
SPLITS = ("train", "test")
TEST_PERCENT = 20  # share of prompts (by hash) that belong to the test split
MAX_MISSES_IN_A_ROW = 5000  # draws in a row without a new prompt before a task counts as exhausted


@dataclass(frozen=True)
class TaskExample:
    """One item: the user's `prompt`, the exact `answer`, and a plausible wrong answer `rejected`."""

    task: str
    prompt: str
    answer: str
    rejected: str


# --------------------------------------------------------------------------------------------------------------
# Task generators: each returns (prompt, answer, rejected) from a random.Random
# --------------------------------------------------------------------------------------------------------------


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    """Addition and subtraction of numbers up to 20 (never negative), multiplication up to 9 * 9, each answered
    with its working and then the result:

        "What is 17 + 15?" -> "7+5=12, 1+1+1=3, 32"          units, then tens with the carry
        "What is 16 - 8?"  -> "10-8=2, 2+6=8, 1-0-1=0, 8"    a borrow: take 8 from ten, add the 6 back
        "What is 13 - 2?"  -> "3-2=1, 1-0-0=1, 11"
        "What is 7 * 4?"   -> "4*7=28, 28"                   the smaller factor first

    Every step is a fact from a one-digit table that the training prompts cover many times over, so a
    held-out question is new only as a combination of known steps; products are written smaller factor
    first so that 4 * 7 and 7 * 4 share one fact. Asked for the bare number instead, a small model must
    learn each pair as its own fact, and misses unseen pairs by one (see benchmarks/RESULTS.md).
    """
    operator = rng.choice("+-*")
    if operator == "*":
        left, right = rng.randint(0, 9), rng.randint(0, 9)
        value = left * right
        working = f"{min(left, right)}*{max(left, right)}={value}"
        rejected = _off_by_one(rng, value, lowest=0)
    else:
        left, right = rng.randint(0, 20), rng.randint(0, 20)
        if operator == "-":
            left, right = max(left, right), min(left, right)
        value = left + right if operator == "+" else left - right
        working = _columns(left, operator, right)
        rejected = _off_by_one(rng, value)
    return f"What is {left} {operator} {right}?", f"{working}, {value}", f"{working}, {rejected}"


def _columns(left: int, operator: str, right: int) -> str:
    """The column working of left + right or left - right (see _arithmetic)."""
    (left_tens, left_units), (right_tens, right_units) = divmod(left, 10), divmod(right, 10)
    if operator == "+":
        carry = (left_units + right_units) // 10
        units = f"{left_units}+{right_units}={left_units + right_units}"
        return f"{units}, {left_tens}+{right_tens}+{carry}={left_tens + right_tens + carry}"
    borrow = int(left_units < right_units)
    if borrow:
        from_ten = 10 - right_units
        units = f"10-{right_units}={from_ten}, {from_ten}+{left_units}={from_ten + left_units}"
    else:
        units = f"{left_units}-{right_units}={left_units - right_units}"
    return f"{units}, {left_tens}-{right_tens}-{borrow}={left_tens - right_tens - borrow}"


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    answer = word[::-1]
    return f"Reverse: {_spelled(word)}", _spelled(answer), _spelled(_near_miss_spelling(rng, answer, word))


def _upper(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    answer = word.upper()
    position = rng.randrange(len(word))  # one letter left in lower case
    rejected = answer[:position] + word[position] + answer[position + 1 :]
    return f"Upper: {_spelled(word)}", _spelled(answer), _spelled(rejected)


def _count(rng: random.Random) -> tuple[str, str, str]:
    """Count a letter in a word drawn from few letters, so letters repeat; sometimes the letter is absent.

    The answer shows its work as a running tally, each letter with the count so far ("Count a in:
    b a n a n a" -> "b0 a1 n1 a2 n2 a3"; the last number is the count). A small model asked for the
    bare number must sum over the word in one step and stays near chance; the tally turns that into
    one copy and one "add 0 or 1" per letter, which it learns (see benchmarks/RESULTS.md).
    """
    letters = rng.sample(string.ascii_lowercase, 4)
    word = "".join(rng.choice(letters) for _ in range(rng.randint(4, 8)))
    letter = rng.choice(letters)
    tally = _running_tally(word, letter)
    wrong_total = _off_by_one(rng, word.count(letter), lowest=0)
    rejected = " ".join([*tally.split()[:-1], word[-1] + wrong_total])  # the right steps, a wrong total
    return f"Count {letter} in: {_spelled(word)}", tally, rejected


def _running_tally(word: str, letter: str) -> str:
    """'banana', 'a' -> 'b0 a1 n1 a2 n2 a3': each letter followed by how many of `letter` so far."""
    steps, count = [], 0
    for character in word:
        count += character == letter
        steps.append(f"{character}{count}")
    return " ".join(steps)


def _sort(rng: random.Random) -> tuple[str, str, str]:
    numbers = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    ordered = sorted(numbers)
    return f"Sort: {_spaced(numbers)}", _spaced(ordered), _spaced(_almost_sorted(rng, ordered))


def _python(rng: random.Random) -> tuple[str, str, str]:
    """A short integer-valued Python expression; redrawn until its value and text are small."""
    while True:
        expression = _expression(rng, depth=rng.randint(1, 2))
        if abs(expression.value) <= 200 and len(expression.text) <= 28:
            return f"Python: {expression.text}", str(expression.value), _off_by_one(rng, expression.value)


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "upper": _upper,
    "count": _count,
    "sort": _sort,
    "python": _python,
}


# --------------------------------------------------------------------------------------------------------------
# The Python expression grammar
#
#   expression := leaf | operand ("+" | "-" | "*") operand | operand ("//" | "%") divisor | call
#   operand    := expression, in parentheses when it is itself infix ("3 * (2 + 4)")
#   divisor    := 2..5
#   call       := "max(" expression ", " expression ")" | "min(...)" | "abs(" expression ")"
#   leaf       := 0..9 | "len('" word "')"
# --------------------------------------------------------------------------------------------------------------

BINARY_OPERATORS: dict[str, Callable[[int, int], int]] = {
    "+": lambda left, right: left + right,
    "-": lambda left, right: left - right,
    "*": lambda left, right: left * right,
    "//": lambda left, right: left // right,
    "%": lambda left, right: left % right,
}


class Expression(NamedTuple):
    text: str
    value: int
    infix: bool  # an operator at the top ("2 + 3"), so it needs parentheses as an operand


def _expression(rng: random.Random, depth: int) -> Expression:
    """A random expression at most `depth` levels deep, with its value."""
    if depth == 0:
        return _leaf(rng)
    kind = rng.choice(("binary", "binary", "binary", "division", "call"))
    if kind == "binary":
        operator = rng.choice("+-*")
        return _infix(_operand(rng, depth - 1), operator, _operand(rng, depth - 1))
    if kind == "division":
        divisor = rng.randint(2, 5)
        return _infix(_operand(rng, depth - 1), rng.choice(("//", "%")), Expression(str(divisor), divisor, False))
    return _call(rng, depth - 1)


def _infix(left: Expression, operator: str, right: Expression) -> Expression:
    value = BINARY_OPERATORS[operator](left.value, right.value)
    return Expression(f"{left.text} {operator} {right.text}", value, True)


def _operand(rng: random.Random, depth: int) -> Expression:
    """An operand of an infix operator: parenthesised when it has an operator of its own."""
    inner = _expression(rng, depth)
    return Expression(f"({inner.text})", inner.value, False) if inner.infix else inner


def _call(rng: random.Random, depth: int) -> Expression:
    """max(a, b), min(a, b) or abs(a)."""
    function = rng.choice(("max", "min", "abs"))
    first = _expression(rng, depth)
    if function == "abs":
        return Expression(f"abs({first.text})", abs(first.value), False)
    second = _expression(rng, depth)
    value = max(first.value, second.value) if function == "max" else min(first.value, second.value)
    return Expression(f"{function}({first.text}, {second.text})", value, False)


def _leaf(rng: random.Random) -> Expression:
    """A digit, or the length of a short quoted word."""
    if rng.random() < 0.2:
        word = _word(rng, shortest=2, longest=5)
        return Expression(f"len('{word}')", len(word), False)
    number = rng.randint(0, 9)
    return Expression(str(number), number, False)


# --------------------------------------------------------------------------------------------------------------
# Small helpers for words and wrong answers
# --------------------------------------------------------------------------------------------------------------


def _word(rng: random.Random, shortest: int = 3, longest: int = 6) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(shortest, longest)))


def _spelled(word: str) -> str:
    """'cat' -> 'c a t'. A BPE token holds several letters that a small model cannot see inside, so the word
    tasks spell their words out: each letter is then one token (' c'), and the task is about letters."""
    return " ".join(word)


def _spaced(numbers: Iterable[int]) -> str:
    return " ".join(str(number) for number in numbers)


def _off_by_one(rng: random.Random, value: int, lowest: int | None = None) -> str:
    """value + 1 or value - 1 (never below `lowest`)."""
    step = rng.choice((-1, 1))
    if lowest is not None and value + step < lowest:
        step = 1
    return str(value + step)


def _near_miss_spelling(rng: random.Random, answer: str, original: str) -> str:
    """A wrong reversal: two neighbouring letters swapped, else the word left as it was, else a letter changed."""
    swaps = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    if swaps:
        i = rng.choice(swaps)
        return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
    if original != answer:
        return original
    replacement = "b" if answer[-1] == "a" else "a"  # e.g. "aaa": no swap or unreversed word differs
    return answer[:-1] + replacement


def _almost_sorted(rng: random.Random, ordered: list[int]) -> list[int]:
    """The sorted list with two unequal neighbours swapped, or (all equal) its last number raised by one."""
    swaps = [i for i in range(len(ordered) - 1) if ordered[i] != ordered[i + 1]]
    wrong = list(ordered)
    if swaps:
        i = rng.choice(swaps)
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    else:
        wrong[-1] += 1
    return wrong


# --------------------------------------------------------------------------------------------------------------
# Public API: examples, splits, checking, and the conversation / preference views
# --------------------------------------------------------------------------------------------------------------


def split_of(prompt: str) -> str:
    """"test" for TEST_PERCENT% of prompts, chosen by a hash of the prompt text, else "train"."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def make_examples(task: str, n: int, split: str = "train", seed: int = 0, at_most: bool = False) -> list[TaskExample]:
    """`n` distinct examples of `task` whose prompts belong to `split`, the same ones for the same seed.

    A task with fewer than `n` distinct prompts in the split is an error, or with `at_most` gives all it has.
    """
    _check_task(task)
    if split not in SPLITS:
        raise BinaryLMError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if n < 0:
        raise BinaryLMError(f"n must be zero or more, got {n}")
    rng = random.Random(f"{task}:{split}:{seed}")
    examples: dict[str, TaskExample] = {}
    misses = 0  # draws in a row that gave nothing new: many mean the task has no more prompts in this split
    while len(examples) < n:
        prompt, answer, rejected = GENERATORS[task](rng)
        if prompt in examples or split_of(prompt) != split:
            misses += 1
            if misses > MAX_MISSES_IN_A_ROW and at_most:
                break
            if misses > MAX_MISSES_IN_A_ROW:
                raise BinaryLMError(
                    f"the {task} task ran out of distinct {split} prompts after {len(examples)} of the {n} asked; "
                    "ask for fewer examples"
                )
            continue
        misses = 0
        examples[prompt] = TaskExample(task, prompt, answer, rejected)
    return list(examples.values())


def make_suite(
    n_per_task: int, split: str = "train", seed: int = 0, tasks: Iterable[str] = TASKS
) -> list[TaskExample]:
    """`n_per_task` examples of each task, shuffled together deterministically."""
    examples = [example for task in tasks for example in make_examples(task, n_per_task, split, seed)]
    random.Random(f"suite:{split}:{seed}").shuffle(examples)
    return examples


def check(task: str, prediction: str, answer: str) -> bool:
    """Exact match after collapsing runs of whitespace and trimming both ends."""
    _check_task(task)
    return _normalise(prediction) == _normalise(answer)


def to_conversation(example: TaskExample) -> list[dict]:
    """The instruction variant: a user prompt and the assistant's exact answer."""
    return [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}]


def to_preference(example: TaskExample) -> dict:
    """The preference variant: {"prompt", "chosen" (the right answer), "rejected" (a plausible wrong one)}."""
    return {"prompt": example.prompt, "chosen": example.answer, "rejected": example.rejected}


def write_messages_jsonl(examples: Iterable[TaskExample], path: str | os.PathLike) -> None:
    """Write the instruction variant as OpenAI-style {"messages": [...]} JSONL, atomically."""
    lines = [json.dumps({"messages": to_conversation(example)}) for example in examples]
    write_atomically(path, "".join(line + "\n" for line in lines).encode("utf-8"))


def write_preferences_jsonl(examples: Iterable[TaskExample], path: str | os.PathLike) -> None:
    """Write the preference variant, one {"prompt", "chosen", "rejected"} object per line, atomically."""
    lines = [json.dumps(to_preference(example)) for example in examples]
    write_atomically(path, "".join(line + "\n" for line in lines).encode("utf-8"))


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _check_task(task: str) -> None:
    if task not in GENERATORS:
        raise BinaryLMError(f"unknown task {task!r}; the built-in tasks are {', '.join(TASKS)}")
