"""lm-evaluation-harness running BinaryLM checkpoints: the `binarylm` model of binarylm/eval/harness.py.

Real harness runs (simple_evaluate and the command line) on small local tasks, offline, checked against our own
scorer, our engine and plain forward passes of the model.
"""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from binarylm.checkpoint import load_checkpoint  # noqa: E402
from binarylm.data.chat import render_chat  # noqa: E402
from binarylm.errors import BinaryLMError  # noqa: E402
from binarylm.eval import harness  # noqa: E402
from binarylm.eval.scoring import rolling_logprobs, score_pairs, split_pair  # noqa: E402
from binarylm.infer.engine import Engine  # noqa: E402
from binarylm.infer.sampling import SamplingParams  # noqa: E402

LONG_CODE = "".join(f"def function_{i}(value):\n    return value * {i} + {i * i}\n\n" for i in range(12))
CHOICE_ROWS = [
    {"context": "def main():\n   ", "choices": ["return 0", "import os"], "label": 0},
    {"context": "for i in", "choices": ["range(10):", "self.items:", "x"], "label": 1},
    {"context": LONG_CODE + "class Foo(", "choices": ["object):", "Base):"], "label": 0},  # longer than the window
]
CHOICE_SPEC = ('output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
               'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')
GENERATE_ROWS = [{"prompt": "def main():\n", "target": "    pass"}, {"prompt": "import os\nfor", "target": " x"},
                 {"prompt": LONG_CODE + "class Foo(", "target": "object):"}]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def saved(base):
    return load_checkpoint(base)


@pytest.fixture(scope="module")
def lm(base):
    return harness.BinaryLM(checkpoint=str(base), batch_size=4)


def _write_task(directory, name: str, rows: list[dict], spec: str) -> str:
    """A task the harness reads from `directory` (a JSONL data file and its YAML); returns its name."""
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    header = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (directory / f"{name}.yaml").write_text(header + spec)
    return name


def _evaluate(base, directory, task: str) -> list[dict]:
    """simple_evaluate with model="binarylm" on one local task; the per-example records. (Only our tasks are
    indexed: the harness's own thousands of task files take seconds to scan.)"""
    tasks = TaskManager(include_path=str(directory), include_defaults=False)
    results = lm_eval.simple_evaluate(model="binarylm", model_args=f"checkpoint={base},batch_size=4", tasks=[task],
                                      task_manager=tasks, log_samples=True)
    return results["samples"][task]


def _direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1,) log p(ids[t] | ids[:t]) for t >= 1, from one plain forward pass in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0][0].double()  # (T - 1, V)
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def _direct_pair(model, tokenizer, context: str, continuation: str) -> float:
    """The split written out: the context's trailing whitespace joins the continuation, whose tokens are what the
    whole text has beyond the context's count (lm-evaluation-harness's rule, also where a token spans the
    boundary); too long a pair keeps its last context + 1 tokens."""
    context_ids = tokenizer.encode_ordinary(context.rstrip())
    continuation_ids = tokenizer.encode_ordinary(context + continuation)[len(context_ids):]
    ids = (context_ids + continuation_ids)[-(model.config.context_length + 1):]
    return _direct_logprobs(model, ids)[-len(continuation_ids):].sum().item()


def _greedy(model, tokenizer, prompt_ids: list[int]) -> str:
    """What our engine generates greedily (no stop strings) in NEW_TOKENS tokens, from a fresh engine."""
    completion = Engine(model, tokenizer, max_batch=1).generate([prompt_ids], SamplingParams(NEW_TOKENS, 0.0))
    return completion[0].samples[0].text


def _recording_engine_calls(monkeypatch) -> list[tuple[list, list]]:
    """Every Engine.generate call from now on, as (prompts, params)."""
    calls, generate = [], Engine.generate

    def recorded(engine, prompts, params):
        calls.append((list(prompts), list(params)))
        return generate(engine, prompts, params)

    monkeypatch.setattr(Engine, "generate", recorded)
    return calls


def test_loglikelihoods_equal_our_scorer_and_a_direct_forward_pass(base, saved, tmp_path):
    samples = _evaluate(base, tmp_path, _write_task(tmp_path, "binarylm_choice", CHOICE_ROWS, CHOICE_SPEC))
    assert len(samples) == len(CHOICE_ROWS)
    pairs = [tuple(arguments) for sample in samples for arguments in sample["arguments"]]
    answers = [tuple(response) for sample in samples for response in sample["filtered_resps"]]
    assert len(pairs) == sum(len(row["choices"]) for row in CHOICE_ROWS)
    ours = score_pairs(saved.model, saved.tokenizer, pairs)
    assert [greedy for _, greedy in answers] == [score.greedy for score in ours]
    assert [logprob for logprob, _ in answers] == pytest.approx([score.logprob for score in ours], abs=1e-6)
    direct = [_direct_pair(saved.model, saved.tokenizer, *pair) for pair in pairs]
    assert [logprob for logprob, _ in answers] == pytest.approx(direct, abs=1e-4)


def test_generations_are_the_engines_greedy_text_cut_at_the_stop_string(base, saved, tmp_path, monkeypatch):
    model, tokenizer = saved.model, saved.tokenizer
    window_for_prompt = model.config.context_length - NEW_TOKENS
    uncut = [_greedy(model, tokenizer, tokenizer.encode_ordinary(row["prompt"])[-window_for_prompt:])
             for row in GENERATE_ROWS]
    stop = uncut[0][2:4]  # a stop string the first generation surely meets
    assert len(stop) == 2
    spec = (f'output_type: generate_until\ndoc_to_text: "{{{{prompt}}}}"\ndoc_to_target: "{{{{target}}}}"\n'
            f"generation_kwargs:\n  until: [{json.dumps(stop)}]\n  max_gen_toks: {NEW_TOKENS}\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n")
    calls = _recording_engine_calls(monkeypatch)
    samples = _evaluate(base, tmp_path, _write_task(tmp_path, "binarylm_generate", GENERATE_ROWS, spec))
    assert [sample["doc"]["prompt"] for sample in samples] == [row["prompt"] for row in GENERATE_ROWS]
    expected = [text.split(stop)[0] for text in uncut]
    assert [sample["resps"][0][0] for sample in samples] == expected
    assert len(expected[0]) < len(uncut[0])  # the stop string did cut
    assert len(calls) == 1 and len(calls[0][0]) == len(GENERATE_ROWS)  # one batch through the shared engine
    assert max(len(prompt) for prompt in calls[0][0]) == window_for_prompt  # the long prompt kept its latest tokens


def _rolling(lm, text: str) -> float:
    return lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]


def test_rolling_loglikelihood_of_a_short_text_is_its_direct_log_prob(lm, saved):
    text = "def main():\n    return 0\n"
    ids = [saved.tokenizer.eot_id, *saved.tokenizer.encode_ordinary(text)]
    assert _rolling(lm, text) == pytest.approx(_direct_logprobs(saved.model, ids).sum().item(), abs=1e-4)


def test_rolling_loglikelihood_of_a_long_text_scores_every_token_once(lm, base, saved):
    model, window = saved.model, saved.model.config.context_length
    ids = [saved.tokenizer.eot_id, *saved.tokenizer.encode_ordinary(LONG_CODE)]
    assert len(ids) > 3 * window
    # stride = context: each run of `window` tokens is scored by one forward pass over the full window that ends
    # with it (the last, shorter run too, as lm-eval's LM.loglikelihood_rolling describes)
    plain = harness.BinaryLM.create_from_arg_string(f"checkpoint={base},stride={window}")
    ends = [min(start + window, len(ids)) for start in range(1, len(ids), window)]
    direct = sum(_direct_logprobs(model, ids[max(end - window - 1, 0):end])[-(end - start):].sum().item()
                 for start, end in zip(range(1, len(ids), window), ends))
    assert _rolling(plain, LONG_CODE) == pytest.approx(direct, abs=1e-3)
    overlapping = rolling_logprobs(model, ids[1:], ids[0])  # the default: windows every half context
    assert len(overlapping) == len(ids) - 1
    assert _rolling(lm, LONG_CODE) == pytest.approx(overlapping.sum().item(), abs=1e-4)
    assert _rolling(lm, LONG_CODE) != pytest.approx(direct, abs=1e-3)  # more history per token: another number


def test_chat_contexts_read_the_chat_tokens_as_ids(base, saved, monkeypatch):
    model, tokenizer = saved.model, saved.tokenizer
    chat_lm = harness.BinaryLM(checkpoint=str(base))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a loop."}]
    rendered = render_chat(messages, tokenizer)
    text = chat_lm.apply_chat_template(messages)
    assert "<|im_start|>assistant" in chat_lm.chat_template(True)
    calls = _recording_engine_calls(monkeypatch)
    chat_lm.generate_until([Instance("generate_until", {}, (text, {"until": ["\n\n"], "max_gen_toks": 4}), 0)])
    (prompt,), (params,) = calls[0]
    assert prompt == rendered.prompt_ids and params.stop_token_ids == rendered.stop_token_ids
    header = tokenizer.encode_ordinary("assistant\n")
    context_ids, continuation_ids = split_pair(tokenizer, "assistant\n", "for i in x:")
    ids = rendered.prompt_ids[:-len(header)] + context_ids + continuation_ids
    (logprob, _), = chat_lm.loglikelihood([Instance("loglikelihood", {}, (text, "for i in x:"), 0)])
    assert logprob == pytest.approx(_direct_logprobs(model, ids)[-len(continuation_ids):].sum().item(), abs=1e-4)


def test_the_command_line_is_lm_evals_own_with_binarylm_registered(base, tmp_path):
    task = _write_task(tmp_path, "binarylm_cli", CHOICE_ROWS, CHOICE_SPEC)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "binarylm.eval.harness", "--model", "binarylm", "--model_args",
               f"checkpoint={base}", "--tasks", task, "--include_path", str(tmp_path), "--limit", "2",
               "--output_path", str(out)]
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]
    written = list(out.rglob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())
    assert results["config"]["model"] == "binarylm" and "acc,none" in results["results"][task]
    assert results["n-samples"][task]["effective"] == 2


def test_a_missing_or_wrong_checkpoint_is_a_clear_error(base, tmp_path, monkeypatch, capsys):
    model = lm_eval.api.registry.get_model("binarylm")
    with pytest.raises(BinaryLMError, match="does not exist"):
        model.create_from_arg_string(f"checkpoint={tmp_path / 'nowhere'}")
    with pytest.raises(BinaryLMError, match="neither a checkpoint nor a run directory"):
        model.create_from_arg_string(f"checkpoint={tmp_path}")
    with pytest.raises(BinaryLMError, match="needs a checkpoint"):
        model.create_from_arg_string("")
    with pytest.raises(BinaryLMError, match="unknown model_args chekpoint"):
        model.create_from_arg_string(f"chekpoint={base}")
    task = _write_task(tmp_path, "binarylm_missing", CHOICE_ROWS, CHOICE_SPEC)
    monkeypatch.setattr(sys, "argv", ["harness"])
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    status = harness.main(["--model", "binarylm", "--model_args", f"checkpoint={tmp_path / 'nowhere'}",
                           "--tasks", task, "--include_path", str(tmp_path)])
    assert status == 2 and "does not exist" in capsys.readouterr().err
