"""`binarylm eval` end to end: benchmarks, a custom YAML task, text and built-in tasks, and its errors."""

import json
import shutil
from pathlib import Path

import pytest

from binarylm.checkpoint import load_checkpoint, resolve_checkpoint
from binarylm.cli import main
from binarylm.eval.formats import read_benchmark
from binarylm.eval.scoring import score_pairs

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture
def checkpoint(base, tmp_path):
    """A private copy of the tiny base checkpoint, so the files eval writes beside it stay in this test."""
    return shutil.copytree(base, tmp_path / "ckpt")


def test_eval_runs_a_benchmark_a_custom_task_and_a_text_and_writes_figures_beside_the_checkpoint(
        checkpoint, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 5)
    assert main(["eval", "-c", str(checkpoint), "--task", f"piqa={FIXTURES / 'piqa.jsonl'}",
                 "--custom", str(FIXTURES / "capitals.yaml"), "--text", str(text), "--builtin", "reverse",
                 "--builtin-examples", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"piqa", "capitals", "text:notes.txt", "builtin"}
    written = resolve_checkpoint(checkpoint) / "eval"

    piqa = json.loads((written / "piqa.json").read_text())
    assert piqa["metrics"]["chance"] == 0.5 and piqa["metrics"]["n"] == len(read_benchmark("piqa", FIXTURES /
                                                                                              "piqa.jsonl"))
    samples = [json.loads(line) for line in (written / "piqa.samples.jsonl").read_text().splitlines()]
    saved = load_checkpoint(checkpoint)
    for sample in samples:  # each saved log-prob is the scorer's on that option
        expected = [score.logprob for score in score_pairs(saved.model, saved.tokenizer, sample["options"])]
        assert sample["logprobs"] == pytest.approx(expected, abs=1e-5)
        assert sample["correct"] == (sample["prediction"] == sample["target"])
    assert piqa["metrics"]["acc"] == sum(sample["correct"] for sample in samples) / len(samples)

    assert json.loads((written / "capitals.json").read_text())["few_shot"] == 1  # the YAML's default
    notes = json.loads((written / "text-notes.json").read_text())["metrics"]
    assert notes["bytes"] == len(text.read_bytes()) and notes["bits_per_byte"] > 0
    assert json.loads((written / "builtin.json").read_text())["metrics"]["n"] == 2


@pytest.mark.parametrize("arguments, message", [
    (["--task", "hellaswagg=x.jsonl"], "unknown benchmark 'hellaswagg'; known: hellaswag"),
    (["--task", "arc"], "write NAME=PATH"),
    (["--task", "arc=nowhere.jsonl"], "nowhere.jsonl"),
    (["--custom", "nowhere.yaml"], "nowhere.yaml"),
    (["--text", "nowhere.txt"], "no such file"),
    (["--builtin", "algebra"], "unknown task 'algebra'"),
])
def test_eval_explains_bad_arguments(checkpoint, arguments, message, capsys):
    assert main(["eval", "-c", str(checkpoint), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_eval_names_the_line_and_fields_of_a_malformed_or_mismatched_file(checkpoint, tmp_path, capsys):
    broken = tmp_path / "arc.jsonl"
    broken.write_text('{"question": "Why?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}\n'
                      '{"question": "Why not?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}\n')
    assert main(["eval", "-c", str(checkpoint), "--task", f"arc={broken}"]) == 2
    error = capsys.readouterr().err
    assert "arc.jsonl, line 2" in error and "answerKey" in error
    broken.write_text('{"question": "Why?", \n')
    assert main(["eval", "-c", str(checkpoint), "--task", f"arc={broken}"]) == 2
    assert "line 1" in capsys.readouterr().err
    hellaswag_rows = (FIXTURES / "hellaswag.jsonl").read_text()
    mismatched = tmp_path / "mismatched.jsonl"
    mismatched.write_text(hellaswag_rows)
    assert main(["eval", "-c", str(checkpoint), "--task", f"piqa={mismatched}"]) == 2
    assert "line 1: missing field 'goal'" in capsys.readouterr().err


def test_a_custom_exact_match_task_compares_the_whole_reply_and_limit_keeps_the_few_shot_pool(checkpoint, tmp_path,
                                                                                               capsys):
    (tmp_path / "words.jsonl").write_text('{"q": "x", "a": "import os"}\n{"q": "y", "a": "def f"}\n')
    (tmp_path / "words.yaml").write_text('name: words\ndata: words.jsonl\nkind: generate\nprompt: "{q} ->"\n'
                                         'answer: "{a}"\nmetric: exact_match\nfew_shot: 1\nmax_new_tokens: 4\n')
    assert main(["eval", "-c", str(checkpoint), "--custom", str(tmp_path / "words.yaml"), "--limit", "1"]) == 0
    capsys.readouterr()
    [record] = [json.loads(line) for line in
                (resolve_checkpoint(checkpoint) / "eval" / "words.samples.jsonl").read_text().splitlines()]
    assert record["extracted"] == (" ".join(record["output"].split()) or None)  # the whole reply, not a number
    assert record["shots"] == [f"{tmp_path / 'words.jsonl'}, line 2"]  # drawn from beyond the limit
