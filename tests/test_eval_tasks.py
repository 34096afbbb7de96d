"""Task evaluators (eval/tasks.py) and error analysis (eval/analysis.py), checked against hand-computed values."""

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from binarylm.checkpoint import load_checkpoint
from binarylm.data.synthetic import check, split_of
from binarylm.errors import BinaryLMError
from binarylm.eval import tasks
from binarylm.eval.analysis import analysis_markdown, failure_categories, load_records, save_records, worst_examples
from binarylm.eval.items import ChoiceItem, GenerationItem
from binarylm.eval.scoring import split_pair
from binarylm.eval.tasks import (
    TaskResult,
    draw_shots,
    evaluate_builtin,
    evaluate_choices,
    evaluate_generation,
    extract_answer,
    with_shots,
)
from binarylm.infer.engine import Engine
from binarylm.infer.sampling import SamplingParams
from binarylm.train.finetune import generate_answers


@pytest.fixture(scope="module")
def tiny(base):
    saved = load_checkpoint(base)
    return saved.model.eval(), saved.tokenizer


# ------------------------------------------------------------------------------------------ a hand-made model


class CharTokenizer:
    """One token per ASCII character (its code); 0 is the end of text."""

    eot_id = 0

    def encode_ordinary(self, text: str) -> list[int]:
        return [ord(character) for character in text]


class UnigramModel(torch.nn.Module):
    """Ignores the context: the next character is 'a' with probability 0.5, 'b' with 0.1, any other of the
    126 with an equal share of the rest. So log p(continuation) is a sum of per-character constants."""

    config = SimpleNamespace(context_length=64)

    def __init__(self):
        super().__init__()
        probs = torch.full((128,), 0.4 / 126, dtype=torch.float64)
        probs[ord("a")], probs[ord("b")] = 0.5, 0.1
        self.log_probs = torch.nn.Parameter(probs.log())

    def forward(self, ids, return_logits=True):
        return self.log_probs.expand(*ids.shape, -1), None  # (B, T, V)


A, B, C = math.log(0.5), math.log(0.1), math.log(0.4 / 126)


def test_acc_sums_log_probs_and_acc_norm_divides_by_bytes_so_long_answers_are_not_penalised():
    items = [
        ChoiceItem("t:1", (("Q:", "aaaa"), ("Q:", "b")), gold=0),  # 4A = -2.77 < B = -2.30, but -0.69/byte > -2.30
        ChoiceItem("t:2", (("Q:", "a"), ("Q:", "bbbbbb")), gold=0),  # right both ways
        ChoiceItem("t:3", (("Q:", "b"), ("Q:", "aa")), gold=0),  # wrong both ways, by 0.92 nats
        ChoiceItem("t:4", (("Q:", "bbb"), ("Q:", "a"), ("Q:", "c")), gold=0),  # wrong both ways, by 6.2 nats
    ]
    result = evaluate_choices(UnigramModel(), CharTokenizer(), items, name="unigram")

    expected = [[4 * A, B], [A, 6 * B], [B, 2 * A], [3 * B, A, C]]
    for record, logprobs in zip(result.records, expected):
        assert record["logprobs"] == pytest.approx(logprobs)
        assert record["bytes"] == [len(continuation) for _, continuation in record["options"]]
    assert [r["prediction"] for r in result.records] == [1, 0, 1, 1]
    assert [r["prediction_norm"] for r in result.records] == [0, 0, 1, 1]
    assert [r["margin"] for r in result.records] == pytest.approx([4 * A - B, A - 6 * B, B - 2 * A, 3 * B - A])
    assert result.name == "unigram"
    assert result.metrics["acc"] == 0.25 and result.metrics["acc_norm"] == 0.5 and result.metrics["n"] == 4
    assert result.metrics["acc_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 3))
    assert result.metrics["chance"] == pytest.approx((0.5 * 3 + 1 / 3) / 4)
    assert failure_categories(result.records) == {"right": 1, "wrong, normalisation would fix it": 1,
                                                  "wrong by a narrow margin (< 1 nat)": 1, "confidently wrong": 1}
    assert [r["source"] for r in worst_examples(result.records, 5)] == ["t:4", "t:3", "t:1"]


# ------------------------------------------------------------------------------------------ few-shot prompts


def solved(source: str, text: str = "") -> ChoiceItem:
    return ChoiceItem(source, (("Q: " + source + "\nA:", " yes"), ("Q: " + source + "\nA:", " no")), 0, text)


def test_without_a_pool_each_item_gets_the_others_as_examples_never_itself():
    items = [solved("one", "Q: one\nA: yes"), solved("two", "Q: two\nA: yes")]
    shots = draw_shots(items, 1)
    assert shots == [[items[1]], [items[0]]]
    assert with_shots(shots[0], "Q: one\nA:") == "Q: two\nA: yes\n\nQ: one\nA:"
    assert with_shots([], "Q: one\nA:") == "Q: one\nA:"


def test_shots_are_reproducible_per_seed_and_index_and_come_from_the_pool():
    pool = [solved(f"train:{i}", f"example {i}") for i in range(10)] + [solved("train:blank")]  # blank: no text
    items = [solved(f"test:{i}") for i in range(8)]
    first, again, other = draw_shots(items, 3, pool, seed=1), draw_shots(items, 3, pool, seed=1), draw_shots(
        items, 3, pool, seed=2)
    assert first == again and first != other
    assert all(len(set(shots)) == 3 and all(s.few_shot_text.startswith("example") for s in shots) for shots in first)
    assert draw_shots(items[:3], 3, pool, seed=1) == first[:3]  # items after i do not change item i's examples
    with pytest.raises(BinaryLMError, match="few_shot=11 .* only 10"):
        draw_shots(items, 11, pool)
    with pytest.raises(BinaryLMError, match="the evaluated items offers only 0"):
        draw_shots(items, 1)  # without a pool the items themselves are the candidates, and none has a few_shot_text


def test_an_item_that_is_also_in_the_pool_is_not_its_own_example():
    items = [solved("a", "A"), solved("b", "B"), solved("c", "C")]
    for index, shots in enumerate(draw_shots(items, 2, pool=items, seed=5)):
        assert items[index] not in shots and len(shots) == 2
    with pytest.raises(BinaryLMError, match="offers only 2"):
        draw_shots(items, 3, pool=items)


def test_examples_come_from_the_items_own_subject_when_it_has_enough(tiny):
    def subject(name: str, index: int) -> ChoiceItem:
        return dataclasses.replace(solved(f"{name}:{index}", f"{name} example {index}"), preamble=f"About {name}.\n\n")

    pool = [subject("biology", i) for i in range(3)] + [subject("physics", 0)]
    biology, physics = subject("biology", 9), subject("physics", 9)
    biology_shots, physics_shots = draw_shots([biology, physics], 2, pool)
    assert {shot.source for shot in biology_shots} <= {"biology:0", "biology:1", "biology:2"}
    assert len(physics_shots) == 2  # one physics example is too few: any subject's
    model, tokenizer = tiny
    result = evaluate_choices(model, tokenizer, [biology], few_shot=2, pool=pool)
    assert result.records[0]["shots"] == [shot.source for shot in biology_shots]


def test_few_shot_choices_score_the_exact_prompt(tiny):
    model, tokenizer = tiny
    pool = [solved("train:0", "Q: is ice cold?\nA: yes")]
    items = [solved("is fire hot?"), solved("is water dry?")]
    result = evaluate_choices(model, tokenizer, items, few_shot=1, pool=pool)
    for item, record in zip(items, result.records):
        assert record["shots"] == ["train:0"]
        contexts = ["Q: is ice cold?\nA: yes\n\n" + context for context, _ in item.options]
        assert record["logprobs"] == pytest.approx(
            [direct_logprob(model, tokenizer, context, " yes" if i == 0 else " no") for i, context in
             enumerate(contexts)], abs=1e-4)


# ------------------------------------------------------------------------------------------ the tiny real model


def direct_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from one plain forward pass over the whole text."""
    context_ids, continuation_ids = split_pair(tokenizer, context, continuation)
    ids = torch.tensor([context_ids + continuation_ids])  # (1, T)
    with torch.no_grad():
        logits, _ = model(ids[:, :-1], return_logits=True)  # (1, T - 1, V)
    log_probs = F.log_softmax(logits.float(), dim=-1)[0]  # (T - 1, V)
    positions = range(len(context_ids) - 1, ids.shape[1] - 1)
    return sum(log_probs[t, ids[0, t + 1]].item() for t in positions)


def test_choice_scores_equal_a_direct_forward_pass(tiny):
    model, tokenizer = tiny
    items = [
        ChoiceItem("q.jsonl:1", (("The capital of France is", " Paris"), ("The capital of France is", " a long way"),
                                 ("The capital of France is", " Rome")), gold=0),
        ChoiceItem("q.jsonl:2", (("def add(a, b): return", " a + b"), ("def add(a, b): return", " None")), gold=1),
        ChoiceItem("wino.jsonl:3", (("The cup is in the box because the cup", " is small."),
                                    ("The cup is in the box because the box", " is small.")), gold=0),
    ]
    result = evaluate_choices(model, tokenizer, items, batch_size=3)
    right, right_norm = 0, 0
    for item, record in zip(items, result.records):
        logprobs = [direct_logprob(model, tokenizer, *option) for option in item.options]
        assert record["logprobs"] == pytest.approx(logprobs, abs=1e-4)
        per_byte = [lp / len(continuation.encode()) for lp, (_, continuation) in zip(logprobs, item.options)]
        best = max(range(len(logprobs)), key=logprobs.__getitem__)
        best_norm = max(range(len(per_byte)), key=per_byte.__getitem__)
        assert (record["prediction"], record["prediction_norm"]) == (best, best_norm)
        wrong = max(lp for i, lp in enumerate(logprobs) if i != item.gold)
        assert record["margin"] == pytest.approx(logprobs[item.gold] - wrong, abs=1e-4)
        assert record["correct"] == (best == item.gold) and record["target"] == item.gold
        right, right_norm = right + (best == item.gold), right_norm + (best_norm == item.gold)
    assert result.metrics["acc"] == pytest.approx(right / 3)
    assert result.metrics["acc_norm"] == pytest.approx(right_norm / 3)
    assert result.metrics["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)


# ------------------------------------------------------------------------------------------ answer extraction


@pytest.mark.parametrize("text, regex, expected", [
    ("She has 3 + 4 = 7 apples.\n#### 7", None, "7"),
    ("#### 1,234 and then 5", None, "1234"),  # the marked answer wins over a later number
    ("First 12 then 30, finally 1,250.", None, "1250"),  # the last number, commas and full stop gone
    ("It costs -3.5 dollars", None, "-3.5"),
    ("5-3 is two", None, "3"),  # a minus between digits is an operator, not a sign
    ("no digits here", None, None),
    ("The answer is (B).", r"answer is \((\w)\)", "B"),
    ("The answer is B", r"answer is \w", "answer is B"),  # no group: the whole match
    ("nothing to see", r"answer is (\w)", None),
])
def test_extract_answer(text, regex, expected):
    assert extract_answer(text, regex) == expected


def test_a_bad_regex_is_a_clear_error():
    with pytest.raises(BinaryLMError, match="not a valid regular expression"):
        extract_answer("x", "(unclosed")


def test_generation_matches_the_engine_and_checks_the_extracted_answer(tiny):
    model, tokenizer = tiny
    prompts = ["Question: what is 2 + 2?\nAnswer:", "def f(x):\n", "Once upon a time"]
    stops = [("\n",), ("\n\n",), (".", "\n")]
    expected = []
    for prompt, stop in zip(prompts, stops):
        params = SamplingParams(max_tokens=12, temperature=0.0, stop=list(stop))
        completion = Engine(model, tokenizer, max_batch=1).generate([tokenizer.encode_ordinary(prompt)], params)[0]
        expected.append(completion.samples[0].text)
    regex = r"(\w+)"
    found = [extract_answer(text, regex) for text in expected]
    answers = [found[0] or "-", "no such answer", "  " + (found[2] or "-") + " "]  # 0 and 2 right if found
    items = [GenerationItem(f"g:{i}", prompt, answer, stop)
             for i, (prompt, answer, stop) in enumerate(zip(prompts, answers, stops))]

    result = evaluate_generation(model, tokenizer, items, regex=regex, max_new_tokens=12, batch_size=3)

    assert [record["output"] for record in result.records] == expected
    assert [record["extracted"] for record in result.records] == found
    right = [found[0] is not None, False, found[2] is not None]
    assert [record["correct"] for record in result.records] == right
    assert result.metrics["exact_match"] == pytest.approx(sum(right) / 3)
    assert result.metrics["extracted"] == pytest.approx(sum(f is not None for f in found) / 3)
    assert not any(record["truncated"] for record in result.records)


def test_a_prompt_too_long_for_the_context_keeps_its_last_tokens(tiny):
    model, tokenizer = tiny
    prompt = "one two three four five six seven eight nine ten " * 4
    ids = tokenizer.encode_ordinary(prompt)
    assert len(ids) > 4
    params = SamplingParams(max_tokens=60, temperature=0.0, stop=["\n\n"])
    expected = Engine(model, tokenizer, max_batch=1).generate([ids[-4:]], params)[0].samples[0].text
    result = evaluate_generation(model, tokenizer, [GenerationItem("long", prompt, "7")], max_new_tokens=60)
    assert result.records[0]["output"] == expected and result.records[0]["truncated"]
    with pytest.raises(BinaryLMError, match="max_new_tokens must be between 1 and 63"):
        evaluate_generation(model, tokenizer, [GenerationItem("x", "hi", "7")], max_new_tokens=64)


# ------------------------------------------------------------------------------------------ built-in tasks


def test_builtin_tasks_use_the_test_split_and_the_tasks_checker(tiny):
    model, tokenizer = tiny
    result = evaluate_builtin(model, tokenizer, ["arithmetic", "reverse"], n_per_task=2, max_new_tokens=8)
    replies = generate_answers(model, tokenizer, [record["prompt"] for record in result.records], 8)
    assert [record["output"] for record in result.records] == replies
    assert [record["task"] for record in result.records] == ["arithmetic"] * 2 + ["reverse"] * 2
    assert all(split_of(record["prompt"]) == "test" for record in result.records)
    assert all(record["correct"] == check(record["task"], record["output"], record["target"])
               for record in result.records)
    assert result.metrics["n"] == 4 and result.records[0]["source"] == "builtin:arithmetic:test:0"


def test_builtin_metrics_per_task_and_overall(tiny, monkeypatch):
    model, tokenizer = tiny
    from binarylm.data.synthetic import make_examples

    answers = {e.prompt: e.answer for e in make_examples("sort", 3, split="test")}
    monkeypatch.setattr(tasks, "generate_answers", lambda model, tokenizer, questions, max_new_tokens: [
        answers.get(question, "") for question in questions])
    result = evaluate_builtin(model, tokenizer, ["sort", "upper"], n_per_task=3)
    assert result.metrics["exact_match_sort"] == 1.0 and result.metrics["exact_match_upper"] == 0.0
    assert result.metrics["exact_match"] == 0.5 and result.metrics["extracted"] == 0.5
    assert failure_categories(result.records) == {"right": 3, "no answer extracted": 3}


# ------------------------------------------------------------------------------------------ analysis


def generated(source: str, extracted, target: str) -> dict:
    return tasks.generation_record(source, "prompt", f"... {extracted}", extracted, target, extracted == target)


def test_generation_categories_and_worst_order():
    records = [generated("right", "12", "12"), generated("off", "11", "12"), generated("far", "100", "12"),
               generated("near", "20", "12"), generated("text", "cat", "dog"), generated("none", None, "12"),
               generated("commas", "1,300", "1,200")]
    assert failure_categories(records) == {"wrong number": 3, "right": 1, "wrong number, off by one": 1,
                                           "wrong text": 1, "no answer extracted": 1}
    # wrong numbers by relative distance: 88 / 12, 8 / 12, 100 / 1200
    assert [r["source"] for r in worst_examples(records, 10)] == ["none", "text", "far", "near", "commas", "off"]
    assert [r["source"] for r in worst_examples(records, 2)] == ["none", "text"]


def test_records_round_trip_and_the_markdown_names_the_worst(tmp_path):
    records = [generated("data.jsonl:1", "7", "7"), generated("data.jsonl:2", None, "8"),
               generated("data.jsonl:3", "a|b\n" + "x" * 200, "9")]
    result = TaskResult("gsm8k", tasks.exact_match_metrics(records), records)
    path = tmp_path / "out" / "gsm8k.jsonl"
    save_records(result, path)
    assert load_records(path) == records
    assert [json.loads(line)["source"] for line in path.read_text().splitlines()] == [r["source"] for r in records]
    text = analysis_markdown(result, k=1)
    assert "### gsm8k" in text and "| exact_match | 0.3333 |" in text and "| n | 3 |" in text
    assert "| no answer extracted | 1 |" in text and "data.jsonl:2" in text and "data.jsonl:3" not in text
    long_row = analysis_markdown(result, k=2).splitlines()[-1]
    assert "a\\|b ⏎ " in long_row and "…" in long_row and "x" * 70 not in long_row
