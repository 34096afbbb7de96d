"""The explorer over real HTTP: POST /v1/internals, GET /v1/explore/*, the page and its files, its limits and errors.

A tiny run with two checkpoints (the `base` fixture's, and a second one saved here) is served by uvicorn on
127.0.0.1; the replies are checked against the contract in binarylm/explore/__init__.py and against the models'
own forward passes. The page's JavaScript is checked with node where it is installed: every module parses, and
the sampling rules it applies to the raw logits match binarylm/infer/sampling.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from binarylm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from binarylm.explore.arrays import decode_array  # noqa: E402
from binarylm.infer.engine import Engine  # noqa: E402
from binarylm.infer.sampling import apply_top_k, apply_top_p  # noqa: E402
from binarylm.model import Transformer  # noqa: E402
from binarylm.serve import explorer  # noqa: E402
from binarylm.serve.app import create_app  # noqa: E402
from binarylm.serve.explorer import PAGE_DIR, CheckpointShelf, ExplorerSettings  # noqa: E402
from binarylm.serve.runner import EngineRunner  # noqa: E402
from binarylm.serve.security import ServerSettings  # noqa: E402

PROMPT = "def add(a, b):\n    return a + b"
KEY = "k" * 24
NODE = Path("/usr/bin/node")
ERROR_FIELDS = {"message", "type", "param", "code"}


# ------------------------------------------------------------------ a run with two checkpoints, served


@pytest.fixture(scope="module")
def run_dir(base, tmp_path_factory) -> Path:
    """A copy of the `base` run (ckpt-000000) plus ckpt-000010, a differently seeded model, and a training log."""
    run = tmp_path_factory.mktemp("explore") / "tiny-run"
    shutil.copytree(base, run)
    saved = load_checkpoint(run / "ckpt-000000")
    torch.manual_seed(1)
    save_checkpoint(run, 10, Transformer(saved.config.model), saved.tokenizer, saved.config)
    records = [{"step": s, "split": "train", "loss": 7.0 - s / 10, "lr": 1e-3 * s / 10, "tokens": 64 * s}
               for s in range(1, 11)] + [{"step": 10, "split": "val", "loss": 6.5, "tokens": 640}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


@pytest.fixture(scope="module")
def served(run_dir):
    saved = load_checkpoint(run_dir)  # latest: ckpt-000010
    runner = EngineRunner(Engine(saved.model, saved.tokenizer, max_batch=2)).start()
    yield saved, runner
    runner.stop()


def serve_app(served, loopback_server, settings: ServerSettings | None = None, **explore_settings):
    saved, runner = served
    settings_ = ExplorerSettings(checkpoint=saved.path, **explore_settings)
    return loopback_server(create_app(runner, saved.tokenizer, "tiny-run", settings, settings_))


@pytest.fixture(scope="module")
def api(served, loopback_server):
    """An HTTP client for the served app over real HTTP."""
    with serve_app(served, loopback_server) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


def forward_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].float()  # (T, V)


def error_of(reply, status: int) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == ERROR_FIELDS
    return error


# ------------------------------------------------------------------ POST /v1/internals


def test_internals_follow_the_contract_and_the_models_own_forward(api, served):
    saved, _ = served
    config, tokenizer = saved.model.config, saved.tokenizer
    reply = api.post("/v1/internals", json={"prompt": PROMPT, "top_k": 3})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) == {"checkpoint", "config", "tokens", "embeddings", "layers", "next_token", "timing_ms"}
    assert body["checkpoint"] == "ckpt-000010" and body["timing_ms"] > 0
    assert body["config"]["n_layer"] == config.n_layer and body["config"]["vocab_size"] == config.vocab_size
    ids = tokenizer.encode(PROMPT)
    assert [t["id"] for t in body["tokens"]] == ids
    assert [bytes.fromhex(t["bytes"]) for t in body["tokens"]] == [tokenizer.decode_bytes([i]) for i in ids]
    T, H, D = len(ids), config.n_head, config.head_dim
    assert decode_array(body["embeddings"]["sum"]).shape == (T, config.d_model)
    assert len(body["layers"]) == config.n_layer
    for layer in body["layers"]:
        attention = {name: decode_array(layer["attention"][name]) for name in ("raw", "scaled", "masked", "softmax")}
        assert all(values.shape == (H, T, T) for values in attention.values())
        assert torch.allclose(torch.from_numpy(attention["softmax"]).sum(-1), torch.ones(H, T), atol=1e-5)
        assert (attention["masked"][:, 0, 1:] == float("-inf")).all() and (attention["softmax"][:, 0, 1:] == 0).all()
        assert all(decode_array(layer[name]).shape == (H, T, D) for name in ("q", "k", "v"))
        assert decode_array(layer["mlp"]).shape == (T, config.d_ff)
        assert all(len(layer["residual_norm"][stage]) == T for stage in ("input", "after_attention", "output"))
        lens = layer["logit_lens"]
        assert [len(row) for row in lens["ids"]] == [3] * T and len(lens["probs"]) == len(lens["texts"]) == T
    logits = decode_array(body["next_token"]["logits"])
    expected = forward_logits(saved.model, ids)[-1]
    assert logits.shape == (config.vocab_size,) and torch.allclose(torch.from_numpy(logits), expected, atol=1e-4)
    assert body["next_token"]["ids"] == expected.topk(200).indices.tolist()
    assert len(body["next_token"]["texts"]) == 200


def test_ids_are_taken_as_given_not_retokenized(api, served):
    tokenizer = served[0].tokenizer
    ids = tokenizer.encode("ret") + tokenizer.encode("urn")  # "return" is one token when encoded as text
    body = api.post("/v1/internals", json={"ids": ids}).json()
    assert [t["id"] for t in body["tokens"]] == ids != tokenizer.encode(tokenizer.decode(ids))
    assert len(body["layers"][0]["logit_lens"]["ids"][0]) == 5  # the default top_k


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": ""}, 400, "the prompt is empty"),
    ({"ids": []}, 400, "ids is empty"),
    ({}, 400, "give a prompt"),
    ({"prompt": "x", "ids": [1]}, 400, "not both"),
    ({"ids": list(range(65))}, 400, "the prompt is 65 tokens; the explorer takes at most 64"),  # the context: 64
    ({"prompt": "x", "top_k": 0}, 400, "top_k must be a whole number from 1 to 20"),
    ({"prompt": "x", "top_k": 21}, 400, "got 21"),
    ({"ids": [1, 99999]}, 400, "token id 99999 is outside the vocabulary"),
    ({"prompt": "x", "checkpoint": "ckpt-000999"}, 404, "available: ckpt-000000, ckpt-000010"),
    ({"prompt": "x", "temperature": 1}, 400, "temperature"),
])
def test_bad_requests_get_a_clear_message_in_openais_shape(api, body, status, words):
    error = error_of(api.post("/v1/internals", json=body), status)
    assert words in error["message"]


def test_a_second_checkpoint_of_the_run_gives_its_own_numbers(api, run_dir):
    served_reply = api.post("/v1/internals", json={"prompt": PROMPT}).json()
    ids = [t["id"] for t in served_reply["tokens"]]
    other = api.post("/v1/internals", json={"ids": ids, "checkpoint": "ckpt-000000"}).json()
    assert other["checkpoint"] == "ckpt-000000" and [t["id"] for t in other["tokens"]] == ids
    first = load_checkpoint(run_dir / "ckpt-000000").model
    theirs = torch.from_numpy(decode_array(other["next_token"]["logits"]))
    assert torch.allclose(theirs, forward_logits(first, ids)[-1], atol=1e-4)
    ours = torch.from_numpy(decode_array(served_reply["next_token"]["logits"]))
    assert not torch.allclose(theirs, ours)  # two different models, not the served one twice
    assert api.post("/v1/internals", json={"ids": ids, "checkpoint": "ckpt-000010"}).json()["checkpoint"] == \
        "ckpt-000010"


def test_internals_are_exact_while_the_engine_generates_with_the_same_model(api, served):
    """The hooks that catch the internals see only their own thread's forward, not the engine's decoding."""
    saved, _ = served
    ids = saved.tokenizer.encode(PROMPT)
    expected = forward_logits(saved.model, ids)[-1]
    body = {"prompt": "import os\n", "max_tokens": 60, "ignore_eos": True, "temperature": 0}
    generating = threading.Thread(target=api.post, args=("/v1/completions",), kwargs={"json": body})
    generating.start()
    try:
        for _ in range(3):
            reply = api.post("/v1/internals", json={"ids": ids}).json()
            assert torch.allclose(torch.from_numpy(decode_array(reply["next_token"]["logits"])), expected, atol=1e-4)
    finally:
        generating.join(60)


def test_other_checkpoints_are_kept_in_a_small_lru(run_dir, served):
    saved, _ = served
    for step in (20, 30):
        save_checkpoint(run_dir / "lru", step, saved.model, saved.tokenizer, saved.config)
    shutil.copytree(run_dir / "ckpt-000000", run_dir / "lru" / "ckpt-000000")
    shelf = CheckpointShelf(saved.model, saved.tokenizer, "x", run_dir / "lru" / "ckpt-000030", max_extra=1)
    assert shelf.run == "lru" and shelf.names() == ["ckpt-000000", "ckpt-000020", "ckpt-000030"]
    assert shelf.get("ckpt-000030")[0] is saved.model and shelf.loaded() == []
    first, _ = shelf.get("ckpt-000000")
    assert shelf.get("ckpt-000000")[0] is first  # kept, not loaded again
    shelf.get("ckpt-000020")
    assert shelf.loaded() == ["ckpt-000020"]  # at most max_extra beside the served model


# ------------------------------------------------------------------ GET /v1/explore/*


def test_checkpoints_curves_and_embeddings(api, served):
    saved, _ = served
    assert api.get("/v1/explore/checkpoints").json() == {
        "run": "tiny-run", "served": "ckpt-000010", "checkpoints": ["ckpt-000000", "ckpt-000010"]}
    curves = api.get("/v1/explore/curves").json()
    assert [p["step"] for p in curves["train"]] == list(range(1, 11)) and curves["train"][-1]["lr"] == 1e-3
    assert curves["val"] == [{"step": 10, "tokens": 640, "loss": 6.5}]
    embedded = api.get("/v1/explore/embeddings").json()
    V = saved.model.config.vocab_size
    assert decode_array(embedded["xy"]).shape == (V, 2) and len(embedded["texts"]) == V
    assert len(embedded["explained"]) == 2 and 0 < embedded["explained"][1] <= embedded["explained"][0] < 1
    other = api.get("/v1/explore/embeddings", params={"checkpoint": "ckpt-000000"}).json()
    assert not (decode_array(other["xy"]) == decode_array(embedded["xy"])).all()
    error = error_of(api.get("/v1/explore/embeddings", params={"checkpoint": "nope"}), 404)
    assert "'nope' is not in run 'tiny-run'" in error["message"]


def test_a_lone_checkpoint_is_its_own_run(served, loopback_server, tmp_path):
    saved, runner = served
    lone = tmp_path / "lone"
    shutil.copytree(saved.path, lone)
    app = create_app(runner, saved.tokenizer, "lone", explorer=ExplorerSettings(checkpoint=lone))
    with loopback_server(app) as base_url:
        assert httpx.get(f"{base_url}/v1/explore/checkpoints").json() == {
            "run": "lone", "served": "lone", "checkpoints": ["lone"]}
        assert httpx.get(f"{base_url}/v1/explore/curves").json() == {"train": [], "val": []}


# ------------------------------------------------------------------ keys and limits


def test_the_api_needs_the_key_and_the_page_does_not(served, loopback_server):
    with serve_app(served, loopback_server, ServerSettings(api_keys=[KEY])) as base_url:
        for method, path in (("post", "/v1/internals"), ("get", "/v1/explore/checkpoints"),
                             ("get", "/v1/explore/embeddings"), ("get", "/v1/explore/curves")):
            error = error_of(httpx.request(method, f"{base_url}{path}", json={"prompt": "x"}), 401)
            assert error["code"] == "invalid_api_key"
        assert httpx.get(f"{base_url}/explore").status_code == 200
        assert httpx.get(f"{base_url}/explore/static/main.js").status_code == 200
        keyed = httpx.post(f"{base_url}/v1/internals", json={"prompt": "x"}, headers={"authorization": f"Bearer {KEY}"})
        assert keyed.status_code == 200 and keyed.json()["tokens"]


def test_a_slow_computation_times_out_and_the_queue_stays_bounded(served, loopback_server, monkeypatch):
    slow_down = threading.Event()
    real = explorer.compute_internals

    def slow(*args, **kwargs):
        if slow_down.is_set():
            time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(explorer, "compute_internals", slow)
    with serve_app(served, loopback_server, timeout_s=0.3, max_pending=1, max_prompt_tokens=8) as base_url:
        post = lambda body: httpx.post(f"{base_url}/v1/internals", json=body, timeout=10)  # noqa: E731
        assert "at most 8" in error_of(post({"ids": list(range(9))}), 400)["message"]
        slow_down.set()
        started = time.perf_counter()
        error = error_of(post({"prompt": "x"}), 504)
        assert "longer than the explorer's limit of 0.3 s" in error["message"]
        assert time.perf_counter() - started < 0.9  # answered at the limit, not when the computation ended
        busy = error_of(post({"prompt": "x"}), 429)  # the timed-out call still holds the worker
        assert "busy" in busy["message"]
        assert "empty" in error_of(post({"prompt": ""}), 400)["message"]  # a bad request is refused at once
        assert httpx.get(f"{base_url}/health").status_code == 200  # the event loop was never blocked
        slow_down.clear()
        time.sleep(1.0)
        assert post({"prompt": "x"}).status_code == 200


# ------------------------------------------------------------------ the page


def references_of(name: str, text: str) -> list[str]:
    """The files a page file loads: src/href in HTML, url() in CSS, import specifiers in JS (relative ones)."""
    if name.endswith(".html"):
        return [ref for ref in re.findall(r'(?:src|href)="([^"#]+)"', text) if not ref.startswith("data:")]
    if name.endswith(".css"):
        return re.findall(r'url\(["\']?([^"\')]+)', text)
    return re.findall(r'(?:import|from)\s*\(?\s*["\'](\.{1,2}/[^"\']+)["\']', text)


def test_the_page_and_every_file_it_loads_are_served_with_their_types(api):
    page = api.get("/explore")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert api.get("/explore/", follow_redirects=True).text == page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    types = {".js": "text/javascript", ".css": "text/css"}
    seen, queue = set(), [("/explore", url) for url in references_of("index.html", page.text)]
    while queue:
        parent, reference = queue.pop()
        url = httpx.URL(f"http://host{parent}").join(reference).path
        if url in seen:
            continue
        seen.add(url)
        reply = api.get(url)
        assert reply.status_code == 200, f"{url} (loaded by {parent}): {reply.status_code}"
        assert reply.headers["content-type"].startswith(types[Path(url).suffix]), url
        queue += [(url, ref) for ref in references_of(url, reply.text)]
    shipped = {f"/explore/static/{p.relative_to(PAGE_DIR).as_posix()}" for p in PAGE_DIR.rglob("*")
               if p.is_file() and p.suffix in types}
    assert seen == shipped  # every file is loaded by the page, and every file the page loads is there


@pytest.mark.parametrize("path", ["/explore/static/nothing.js", "/explore/static/..%2F..%2Fapp.py",
                                  "/explore/static/%2e%2e/%2e%2e/app.py", "/explore/static/"])
def test_only_the_pages_own_files_are_served(api, path):
    assert api.get(path).status_code == 404


def test_the_ids_the_page_promises_exist():
    """Browser tests drive the page by the ids listed at the top of index.html: each is in the HTML (or set by JS)."""
    html = (PAGE_DIR / "index.html").read_text()
    comment = html[html.index("<!--"):html.index("-->")]
    promised = set(re.findall(r"#([a-z][\w-]*)", comment))
    defined = set(re.findall(r'\bid="([\w-]+)"', html))
    defined |= {found for js in PAGE_DIR.rglob("*.js") for found in re.findall(r"\.id = '([\w-]+)'", js.read_text())}
    assert promised and promised <= defined, promised - defined
    for required in ("prompt", "run", "tokens", "layer", "head", "attention-mode", "attention", "temperature",
                     "top-k", "top-p", "step", "next-token", "logit-lens", "embedding-search", "compare-checkpoint",
                     "error"):
        assert required in defined


needs_node = pytest.mark.skipif(not NODE.exists(), reason="node is not installed at /usr/bin/node")


@needs_node
def test_every_javascript_module_parses():
    for module in sorted(PAGE_DIR.rglob("*.js")):
        checked = subprocess.run([str(NODE), "--check", str(module)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, f"{module.name}: {checked.stderr}"


@needs_node
def test_the_pages_sampling_matches_the_servers():
    """softmax(logits / T), top-k, top-p in sampling.js against binarylm/infer/sampling.py on the same logits."""
    torch.manual_seed(0)
    logits = torch.randn(300) * 3
    settings = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 40, 1.0), (1.0, 0, 0.9), (0.5, 25, 0.6), (2.0, 5, 0.3)]
    script = (f"import {{ filteredDistribution }} from {json.dumps((PAGE_DIR / 'sampling.js').as_uri())};\n"
              f"const logits = Float32Array.from({json.dumps(logits.tolist())});\n"
              f"const settings = {json.dumps(settings)};\n"
              "console.log(JSON.stringify(settings.map(([temperature, topK, topP]) =>\n"
              "  Array.from(filteredDistribution(logits, { temperature, topK, topP }).probs))));\n"
              "console.log(JSON.stringify(filteredDistribution(logits, { temperature: 0 }).probs.indexOf(1)));\n")
    ran = subprocess.run([str(NODE), "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    page = torch.tensor(json.loads(lines[0]))
    wire = torch.tensor(logits.tolist(), dtype=torch.float32)[None]  # what the page reads: float32
    for row, (temperature, top_k, top_p) in zip(page, settings):
        expected = torch.softmax(apply_top_p(apply_top_k(wire / temperature, top_k), top_p), dim=-1)[0]
        assert torch.allclose(row, expected, atol=1e-6), (temperature, top_k, top_p)
    assert json.loads(lines[1]) == int(logits.argmax())


# ------------------------------------------------------------------ the CLI


def test_binarylm_explore_serves_on_loopback_and_opens_the_page(monkeypatch):
    from binarylm import cli

    calls = []
    monkeypatch.setattr(cli, "serve", calls.append)
    monkeypatch.setattr(cli, "_open_when_ready", lambda url: calls.append(url))
    assert cli.main(["explore", "-c", "runs/x", "--port", "8123", "--no-browser", "--threads", "1"]) == 0
    (args,) = calls
    assert (args.host, args.port, args.checkpoint, args.explore_max_tokens) == ("127.0.0.1", 8123, "runs/x", 256)
    assert args.threads == 1  # handed on to serve, which sets PyTorch's threads
    calls.clear()
    assert cli.main(["explore", "-c", "runs/x", "--port", "8124"]) == 0
    for _ in range(100):  # the browser is opened from a thread
        if len(calls) == 2:
            break
        time.sleep(0.01)
    assert "http://127.0.0.1:8124" in calls


def test_the_browser_opens_once_the_server_is_healthy(api, monkeypatch):
    from binarylm import cli

    opened = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    cli._open_when_ready(str(api.base_url).rstrip("/"), wait_s=10)
    assert opened == [f"{str(api.base_url).rstrip('/')}/explore"]


def test_binarylm_serve_prints_the_explorer_address(run_dir, monkeypatch, capsys):
    import uvicorn

    from binarylm import cli

    monkeypatch.setattr(uvicorn, "run", lambda app, **options: app.wait(120))  # load the model, serve nothing
    monkeypatch.setattr(cli, "_log_access_to_stderr", lambda: None)  # no handler left on capsys' stream
    assert cli.main(["serve", "-c", str(run_dir), "--port", "8125"]) == 0
    assert "model explorer: http://127.0.0.1:8125/explore" in capsys.readouterr().err


def test_explorer_settings_are_checked():
    from binarylm.errors import BinaryLMError

    with pytest.raises(BinaryLMError, match="max_prompt_tokens"):
        ExplorerSettings(max_prompt_tokens=0)
