"""The built-in verifiable tasks: seeded, split by prompt, exactly checked, with wrong answers that are wrong."""

import json
import re

import pytest

from binarylm.data import synthetic
from binarylm.data.chat import read_conversations
from binarylm.data.synthetic import (
    TASKS,
    TaskExample,
    check,
    make_examples,
    make_suite,
    split_of,
    to_conversation,
    to_preference,
    write_messages_jsonl,
    write_preferences_jsonl,
)
from binarylm.errors import BinaryLMError


def answer_by_hand(task: str, prompt: str) -> str:
    """The answer recomputed from the prompt text alone, independently of the generators."""
    if task == "arithmetic":
        left, operator, right = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", prompt).groups()
        value = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[operator](int(left), int(right))
        return f"{column_working(int(left), operator, int(right))}, {value}"
    argument = prompt.split(": ", 1)[1]
    if task == "reverse":
        return argument[::-1]
    if task == "upper":
        return argument.upper()
    if task == "count":
        letter = re.fullmatch(r"Count (\w) in", prompt.split(":")[0]).group(1)
        letters = argument.split()
        return " ".join(f"{c}{letters[: i + 1].count(letter)}" for i, c in enumerate(letters))
    if task == "sort":
        return " ".join(str(number) for number in sorted(int(word) for word in argument.split()))
    return str(eval(argument, {"__builtins__": {"len": len, "max": max, "min": min, "abs": abs}}))  # our own text


def column_working(left: int, operator: str, right: int) -> str:
    """Units column first (a borrow takes the bottom digit from ten and adds the top one back), then tens with
    the carry or borrow; products smaller factor first."""
    top, bottom = [left % 10, left // 10], [right % 10, right // 10]
    if operator == "*":
        return f"{sorted([left, right])[0]}*{sorted([left, right])[1]}={left * right}"
    if operator == "+":
        carry = (top[0] + bottom[0]) // 10
        return f"{top[0]}+{bottom[0]}={top[0] + bottom[0]}, {top[1]}+{bottom[1]}+{carry}={top[1] + bottom[1] + carry}"
    if top[0] >= bottom[0]:
        return f"{top[0]}-{bottom[0]}={top[0] - bottom[0]}, {top[1]}-{bottom[1]}-0={top[1] - bottom[1]}"
    rest = 10 - bottom[0]
    return f"10-{bottom[0]}={rest}, {rest}+{top[0]}={rest + top[0]}, {top[1]}-{bottom[1]}-1={top[1] - bottom[1] - 1}"


def test_every_step_of_the_arithmetic_working_is_a_true_one_digit_fact():
    examples = make_examples("arithmetic", 300, split="train", seed=5)
    for example in examples:
        *steps, result = example.answer.split(", ")
        for step in steps:
            expression, value = step.split("=")
            assert eval(expression) == int(value) and all(int(n) <= 10 for n in re.findall(r"\d+", expression))
        assert int(result) == eval(example.prompt[len("What is "):-1])


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_right(task):
    for example in make_examples(task, 200, split="train", seed=3):
        assert example.task == task and example.answer == answer_by_hand(task, example.prompt), example


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_examples_other_seed_other_examples(task):
    first = make_examples(task, 30, seed=1)
    assert first == make_examples(task, 30, seed=1)
    assert first != make_examples(task, 30, seed=2)
    assert len({example.prompt for example in first}) == 30


@pytest.mark.parametrize("task", TASKS)
def test_test_prompts_never_appear_in_any_training_set(task):
    test_prompts = {example.prompt for seed in (0, 1) for example in make_examples(task, 100, "test", seed)}
    train_prompts = {example.prompt for seed in (0, 1) for example in make_examples(task, 300, "train", seed)}
    assert test_prompts and train_prompts and not test_prompts & train_prompts
    assert {split_of(prompt) for prompt in test_prompts} == {"test"}


@pytest.mark.parametrize("task", TASKS)
def test_rejected_answers_differ_and_fail_the_checker(task):
    for example in make_examples(task, 200, seed=4):
        preference = to_preference(example)
        assert preference == {"prompt": example.prompt, "chosen": example.answer, "rejected": example.rejected}
        assert check(task, preference["chosen"], example.answer)
        assert preference["rejected"] != preference["chosen"]
        assert not check(task, preference["rejected"], example.answer), example


def test_checker_normalises_whitespace_only():
    assert check("arithmetic", " 42\n", "42")
    assert not check("arithmetic", "43", "42")
    assert not check("arithmetic", "4 2", "42")
    assert check("sort", "1  3\t5 ", "1 3 5")
    assert not check("sort", "1,3,5", "1 3 5")
    assert not check("upper", "Cat", "CAT")
    with pytest.raises(BinaryLMError, match="unknown task"):
        check("poetry", "x", "x")


def test_python_expressions_by_hand():
    assert answer_by_hand("python", "Python: 3 * (2 + 4)") == "18"
    assert answer_by_hand("python", "Python: len('abc') + 2") == "5"
    assert answer_by_hand("python", "Python: (2 - 9) % 3") == "2"
    texts = [example.prompt for example in make_examples("python", 300, seed=5)]
    assert any("(" in text and "len(" not in text for text in texts)  # the grammar nests
    assert any(function in text for text in texts for function in ("max(", "min(", "abs(", "//", "%"))


def test_bad_requests_are_clear_errors(monkeypatch):
    with pytest.raises(BinaryLMError, match="unknown task"):
        make_examples("poetry", 1)
    with pytest.raises(BinaryLMError, match="split"):
        make_examples("reverse", 1, split="validation")
    tiny_task = lambda rng: (f"Reverse: {rng.choice('ab')}", "x", "y")
    monkeypatch.setitem(synthetic.GENERATORS, "reverse", tiny_task)
    with pytest.raises(BinaryLMError, match="ran out of distinct"):
        make_examples("reverse", 5, split="train")


def test_suite_mixes_every_task_deterministically():
    suite = make_suite(5, split="test", seed=0)
    assert sorted(example.task for example in suite) == sorted(TASKS * 5)
    assert suite == make_suite(5, split="test", seed=0)


def test_messages_jsonl_is_read_back_by_the_chat_reader(tmp_path):
    examples = make_suite(3, seed=0)
    path = tmp_path / "tasks.jsonl"
    write_messages_jsonl(examples, path)
    assert read_conversations(path) == [to_conversation(example) for example in examples]
    example = TaskExample("reverse", "Reverse: cat", "tac", "tca")
    assert to_conversation(example) == [
        {"role": "user", "content": "Reverse: cat"},
        {"role": "assistant", "content": "tac"},
    ]


def test_preferences_jsonl(tmp_path):
    path = tmp_path / "preferences.jsonl"
    write_preferences_jsonl([TaskExample("upper", "Upper: cat", "CAT", "CaT")], path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"prompt": "Upper: cat", "chosen": "CAT", "rejected": "CaT"}
    ]
