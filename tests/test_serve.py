"""The HTTP API, driven by the real `openai` client and by raw requests."""

import json

import pytest
import torch

from binarylm.config import ModelConfig
from binarylm.infer.engine import Engine
from binarylm.infer.sampling import SamplingParams
from binarylm.model import Transformer

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from fastapi.testclient import TestClient  # noqa: E402

from binarylm.serve.app import create_app  # noqa: E402
from binarylm.serve.runner import EngineRunner  # noqa: E402

PROMPT = "def main():\n    "


@pytest.fixture(scope="module")
def served(small_tokenizer):
    """The app in-process (FastAPI's TestClient) for raw HTTP checks."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=small_tokenizer.vocab_size, context_length=64, n_layer=2, n_head=2, d_model=32)
    model = Transformer(config).eval()
    runner = EngineRunner(Engine(model, small_tokenizer, max_batch=4)).start()
    client = TestClient(create_app(runner, small_tokenizer, "tiny"))
    yield model, small_tokenizer, client, runner
    runner.stop()


@pytest.fixture(scope="module")
def loopback(served, loopback_server):
    """The same app behind a real uvicorn server on 127.0.0.1, and an `openai` client pointed at it."""
    model, tokenizer, client, runner = served
    with loopback_server(client.app) as base_url:
        yield model, tokenizer, openai.OpenAI(api_key="unused", base_url=f"{base_url}/v1", max_retries=0)


def direct(model, tokenizer, prompt: str, **settings) -> str:
    engine = Engine(model, tokenizer, max_batch=1)
    return engine.generate([tokenizer.encode(prompt)], SamplingParams(**settings))[0].samples[0].text


def test_the_openai_client_gets_the_engines_greedy_text(loopback):
    model, tokenizer, api = loopback
    answer = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert answer.choices[0].text == direct(model, tokenizer, PROMPT, max_tokens=12, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert answer.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert [m.id for m in api.models.list().data] == ["tiny"]


def test_streaming_adds_up_to_the_whole_answer_and_reports_usage(loopback):
    model, tokenizer, api = loopback
    chunks = list(api.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == direct(model, tokenizer, PROMPT, max_tokens=10, temperature=0)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_several_prompts_n_samples_token_ids_and_echo_with_logprobs(served):
    _, tokenizer, client, _ = served
    ids = tokenizer.encode("import os\n")
    body = {"prompt": [PROMPT, "import os\n"], "max_tokens": 5, "temperature": 0.9, "seed": 3, "n": 2, "logprobs": 2,
            "echo": True}
    answer = client.post("/v1/completions", json=body).json()
    assert sorted(c["index"] for c in answer["choices"]) == [0, 1, 2, 3]
    second = next(c for c in answer["choices"] if c["index"] == 2)
    assert second["text"].startswith("import os\n")
    lp = second["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(ids) + 5
    assert all(len(top) == 2 for top in lp["top_logprobs"][len(ids):])
    assert lp["text_offset"][len(ids)] == len("import os\n")
    by_ids = client.post("/v1/completions", json={**body, "prompt": [ids], "echo": False, "n": 1}).json()
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    assert by_ids["choices"][0]["logprobs"]["text_offset"][0] == len("import os\n")  # counted from the prompt start


def test_tokenize_detokenize_and_tokenizer_info(served):
    _, tokenizer, client, _ = served
    tokens = client.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["tokens"] == tokenizer.encode(PROMPT) and tokens["max_model_len"] == 64
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": PROMPT}
    assert client.get("/tokenizer_info").json()["vocab_size"] == tokenizer.vocab_size
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("method, path, body, status, words", [
    ("post", "/v1/completions", {"prompt": "x" * 200, "max_tokens": 60}, 400, "exceed the context"),
    ("post", "/v1/completions", {"prompt": "x", "temprature": 0}, 400, "temprature"),
    ("post", "/v1/completions", {"prompt": "x", "model": "gpt-5"}, 404, "does not exist"),
    ("post", "/v1/completions", {"prompt": [], "max_tokens": 1}, 400, "prompt is empty"),
    ("post", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("get", "/v1/nothing", None, 404, "Not Found"),
])
def test_errors_have_openais_shape(served, method, path, body, status, words):
    _, _, client, _ = served
    response = client.request(method, path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_sse_wire_format_ends_with_done(served):
    _, _, client, _ = served
    with client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "stream": True}) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_chat_completions_render_the_template_and_stream_deltas(loopback, served):
    from binarylm.data.chat import render_chat

    model, tokenizer, api = loopback
    client = served[2]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f():"}]
    answer = api.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=2)
    rendered = render_chat(messages, tokenizer)
    expected = Engine(model, tokenizer).generate([rendered.prompt_ids], SamplingParams(
        temperature=0, max_tokens=8, stop_token_ids=rendered.stop_token_ids))[0].samples[0]
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == expected.text
    assert len(answer.choices[0].logprobs.content) == len(expected.token_ids)
    assert answer.usage.prompt_tokens == len(rendered.prompt_ids)
    chunks = list(api.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    bad = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
    assert bad.status_code == 400 and "role in system, user, assistant" in bad.json()["error"]["message"]


def test_metrics_and_request_ids(served):
    _, _, client, _ = served
    reply = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0},
                        headers={"x-request-id": "client-7"})
    assert reply.headers["x-request-id"] == "client-7"
    text = client.get("/metrics").text
    for name in ("binarylm_time_to_first_token_seconds_count", "binarylm_queue_time_seconds_count",
                 "binarylm_inter_token_latency_seconds_bucket", 'binarylm_requests_total{outcome="ok"}',
                 "binarylm_generation_tokens_total", "binarylm_requests_running", "binarylm_http_requests_total"):
        assert name in text
    counts = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert counts["binarylm_generation_tokens_total"] >= 4


def test_a_server_side_abort_reaches_the_stream_as_an_in_band_error(served):
    import threading
    import time

    _, _, client, runner = served
    aborted = threading.Event()

    def abort_the_first_running_request():
        for _ in range(400):
            running = [sequence.request.request_id for sequence in runner.engine.running]
            if running:
                runner.abort(running[0])
                aborted.set()
                return
            time.sleep(0.005)

    threading.Thread(target=abort_the_first_running_request).start()
    body = {"prompt": PROMPT, "max_tokens": 50, "stream": True, "ignore_eos": True}
    with client.stream("POST", "/v1/completions", json=body) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert aborted.is_set()
    assert any('"type": "server_error"' in line for line in lines) and lines[-1] == "data: [DONE]"


def test_the_openai_client_gets_logprobs_and_echo_over_real_http(loopback):
    model, tokenizer, api = loopback
    answer = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3, echo=True)
    logprobs = answer.choices[0].logprobs
    prompt_ids = tokenizer.encode(PROMPT)
    assert answer.choices[0].text.startswith(PROMPT) and len(logprobs.tokens) == len(prompt_ids) + 4
    assert logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt_ids]))[0][0].double(), dim=-1)
    assert abs(logprobs.token_logprobs[1] - reference[0, prompt_ids[1]].item()) < 1e-4


def _lm_eval_task(directory, name: str, rows: list[dict], spec: str) -> None:
    """A task definition lm-evaluation-harness reads from `directory`: a JSONL data file and its YAML."""
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    header = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (directory / f"{name}.yaml").write_text(header + spec)


def _run_lm_eval(base_url: str, directory, task: str) -> list[dict]:
    """lm-evaluation-harness's own `local-completions` model against our server; the per-example records."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={base_url}/v1/completions,model=tiny,tokenizer_backend=remote,max_length=64",
        tasks=[task], task_manager=TaskManager(include_path=str(directory)), log_samples=True,
    )
    return results["samples"][task]


def _continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Our own scoring of `continuation` after `context`, split into tokens the way the harness splits them: the
    context's trailing whitespace moves to the continuation, and the continuation is what the whole text's tokens
    have beyond the context's token count (so the ids are the context's tokens, then the rest of the whole's)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = tokenizer.encode(context)
    ids = context_ids + tokenizer.encode(context + continuation)[len(context_ids):]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)  # (T, V)
    return sum(log_probs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def test_lm_evaluation_harness_scores_a_loglikelihood_task_through_the_server(served, loopback_server, tmp_path):
    model, tokenizer, client, _ = served
    rows = [{"context": "def main():\n   ", "choices": ["return 0", "import os"], "label": 0},
            {"context": "for i in", "choices": ["range(10):", "self.items:", "x"], "label": 1}]
    _lm_eval_task(tmp_path, "binarylm_choice", rows, 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
                  'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')
    with loopback_server(client.app) as base_url:
        samples = _run_lm_eval(base_url, tmp_path, "binarylm_choice")
    assert len(samples) == len(rows)
    for sample in samples:
        row = sample["doc"]
        scores = [float(score) for score, _ in sample["filtered_resps"]]
        expected = [_continuation_logprob(model, tokenizer, row["context"], " " + c) for c in row["choices"]]
        assert scores == pytest.approx(expected, abs=1e-4)


def test_lm_evaluation_harness_runs_a_generation_task_through_the_server(served, loopback_server, tmp_path):
    model, tokenizer, client, _ = served
    rows = [{"prompt": "def main():\n", "target": "    pass"}, {"prompt": "class Foo(", "target": "object):"}]
    _lm_eval_task(tmp_path, "binarylm_generate", rows, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
                  'doc_to_target: "{{target}}"\ngeneration_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 8\n'
                  '  do_sample: false\nmetric_list:\n  - metric: exact_match\n')
    with loopback_server(client.app) as base_url:
        samples = _run_lm_eval(base_url, tmp_path, "binarylm_generate")
    assert len(samples) == len(rows)
    for sample in samples:
        expected = direct(model, tokenizer, sample["doc"]["prompt"], max_tokens=8, temperature=0, stop=["\n\n"])
        assert sample["filtered_resps"][0] == expected
