"""Report cards from run directories written by hand in the shapes pretrain, `binarylm eval` and the task
evaluators write: one run, two runs side by side, a run with nothing to evaluate, and the HTML renderer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from binarylm.config import build_config
from binarylm.errors import BinaryLMError
from binarylm.eval.report import markdown_to_html, report_card, write_report
from binarylm.model import Transformer

PNG_START, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def make_run(root: Path, name: str, d_model: int = 32, bpb: float = 1.2345, evaluated: bool = True) -> Path:
    """A pretraining run after 40 steps: metrics.jsonl, data/train.json, ckpt-000040 with its files."""
    run = root / name
    config = build_config({"model": {"n_layer": 2, "n_head": 2, "d_model": d_model, "context_length": 16,
                                     "vocab_size": 300},
                           "train": {"out_dir": str(run), "max_steps": 40, "warmup_steps": 5, "lr": 3e-3}})
    records = []
    for step in (1, 10, 20, 30, 40):
        records.append({"step": step, "split": "train", "time": step * 0.5, "loss": 6.0 - step / 10,
                        "lr": 3e-3 * min(1.0, step / 5), "grad_norm": 1.0, "tokens_per_sec": 1000.0 + step,
                        "tokens": step * 64})
        if step % 20 == 0:
            records.append({"step": step, "split": "val", "time": step * 0.5 + 0.1, "loss": 6.2 - step / 10,
                            "perplexity": 400.0, "bits_per_byte": 2.0, "tokens": step * 64})
    (run / "data").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (run / "data" / "train.json").write_text(json.dumps({"split": "train", "num_tokens": 10_000, "num_bytes": 30_000,
                                                         "num_documents": 12}))
    checkpoint = run / "ckpt-000040"
    (checkpoint / "eval").mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps(config.to_dict()))
    (checkpoint / "metrics.json").write_text(json.dumps({"train_loss": 2.0, "val_loss": 2.2, "step": 40,
                                                         "tokens_seen": 2560, "elapsed_seconds": 21.0}))
    (run / "latest").write_text("ckpt-000040\n")
    if evaluated:
        (checkpoint / "eval.json").write_text(json.dumps({
            "loss": 3.1, "perplexity": 22.2, "bits_per_byte": bpb, "xz_bits_per_byte": 2.3456, "beats_xz": True,
            "tokens": 4096, "bytes": 12_000, "checkpoint": str(checkpoint)}))
        (checkpoint / "eval" / "hellaswag.json").write_text(json.dumps({
            "task": "hellaswag", "metrics": {"acc": 0.31, "acc_norm": 0.33, "acc_stderr": 0.02}, "chance": 0.25}))
        (checkpoint / "eval" / "arithmetic.json").write_text(json.dumps({
            "task": "arithmetic", "metrics": {"exact_match": 0.125}}))
    return run


def parameters(run: Path) -> int:
    config = build_config(json.loads((run / "ckpt-000040" / "config.json").read_text()))
    return Transformer(config.model).num_parameters()


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_START) and data.endswith(PNG_END), path


def assert_plain_html(page: str) -> None:
    """Nothing of the markdown is left in the page body, and nothing needs JavaScript or the network."""
    body = page.split("<body>", 1)[1]
    for token in ("**", "```", "![", "](", "|---"):
        assert token not in body, token
    for pattern in (r"^#", r"^\|", r"^- "):
        assert not re.search(pattern, body, re.MULTILINE), pattern
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_one_run_card_shows_configuration_training_evaluation_and_baselines(tmp_path):
    run = make_run(tmp_path, "tiny")
    markdown_path, html_path = report_card([run])
    assert (markdown_path, html_path) == (run / "card.md", run / "card.html")
    text = markdown_path.read_text()
    total = parameters(run)
    assert f"{total / 1e3:.2f}K" in text and "| layers / width / heads | 2 / 32 / 2 |" in text
    assert "| tokens seen | 2,560 (0.26 epochs) |" in text and "| wall time | 21 s |" in text
    assert "| throughput | 1,025 tokens/s |" in text  # the median logged rate, step 1 left out
    assert "| bits per byte | **1.2345** |" in text and "| `xz -9e` bits per byte (baseline) | 2.3456 |" in text
    assert "The model beats `xz -9e` on 12,000 bytes" in text
    assert "| hellaswag | acc | 31.0% ± 2.0% | 25.0% |" in text and "| hellaswag | acc_norm | 33.0% | 25.0% |" in text
    assert "| arithmetic | exact_match | 12.5% | — |" in text
    assert "## Missing" in text and "no saved samples" in text and "binarylm eval" not in text.split("## Config")[0]
    for image in ("card-loss.png", "card-lr.png"):
        assert f"]({image})" in text
        assert_valid_png(run / image)
    page = html_path.read_text()
    assert "<td>bits per byte</td><td><strong>1.2345</strong></td>" in page
    assert "<td>hellaswag</td><td>acc</td><td>31.0% ± 2.0%</td><td>25.0%</td>" in page
    assert page.count('<img src="data:image/png;base64,') == 2 and 'alt="loss curves"' in page
    assert_plain_html(page)


def test_comparison_card_has_a_column_per_run_and_one_plot_per_figure(tmp_path):
    small = make_run(tmp_path / "runs", "small", d_model=32, bpb=1.5)
    big = make_run(tmp_path / "runs", "big", d_model=64, bpb=1.1)
    markdown_path, html_path = report_card([small, big], tmp_path / "out" / "compare.md")
    text = markdown_path.read_text()
    assert "# Report card: small vs big" in text and "|  | small | big |" in text
    assert f"| parameters | {parameters(small) / 1e3:.2f}K" in text and f"{parameters(big) / 1e3:.2f}K" in text
    assert "| measure | small | big |" in text and "| bits per byte | **1.5000** | **1.1000** |" in text
    assert "| task | metric | small | big | baseline |" in text
    assert "| hellaswag | acc | 31.0% ± 2.0% | 31.0% ± 2.0% | 25.0% |" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compare-loss.png", "compare-lr.png",
                                                                   "compare.html", "compare.md"]
    assert_valid_png(tmp_path / "out" / "compare-loss.png")
    assert "<th>small</th><th>big</th>" in html_path.read_text()
    assert report_card([small, big])[0] == tmp_path / "runs" / "comparison.md"


def test_a_run_with_nothing_to_evaluate_gets_a_card_that_says_what_is_missing(tmp_path):
    run = make_run(tmp_path, "plain", evaluated=False)
    text = report_card([run])[0].read_text()
    assert "## Missing" in text and f"`binarylm eval --checkpoint {run / 'ckpt-000040'}`" in text
    assert "no task results" in text and "## Held-out evaluation" not in text and "## Tasks" not in text
    assert "| final validation loss | 2.2000 |" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    markdown_path, html_path = report_card([empty])
    text = markdown_path.read_text()
    assert "no metrics.jsonl" in text and f"`binarylm pretrain --train.out_dir {empty}`" in text
    assert "| config.json | not found |" in text and not list(empty.glob("*.png"))
    assert_plain_html(html_path.read_text())
    with pytest.raises(BinaryLMError, match="does not exist"):
        report_card([tmp_path / "nowhere"])


def test_the_demo_report_keeps_its_figures_and_samples_for_the_card(tmp_path):
    run = make_run(tmp_path, "demo", evaluated=False)
    evaluation = {"bits_per_byte": 2.5, "xz_bits_per_byte": 1.5, "loss": 3.0, "perplexity": 20.1,
                  "tokens": 1000, "bytes": 3000}
    stages = [{"stage": "sft", "step": 4, "elapsed_seconds": 30.0, "before_accuracy_upper": 0.0,
               "before_accuracy": 0.0, "after_accuracy_upper": 0.5, "after_accuracy": 0.5}]
    report = write_report(run, "Demo", {"model": "tiny"}, evaluation, [("def ", "f(x):\n    return 2 + x\n")], stages)
    text = report.read_text()
    assert "does not beat `xz -9e`" in text and "**2.5000**" in text and "| upper | 0% | 50% |" in text
    assert_valid_png(run / "loss.png")
    card = report_card([run])[0].read_text()
    assert "| bits per byte | **2.5000** |" in card and "def f(x):\n    return 2 + x" in card
    assert "| upper | 0% | 50% |" in card and "no saved samples" not in card
    page = report_card([run])[1].read_text()
    assert "<pre><code>def f(x):\n    return 2 + x\n</code></pre>" in page
    assert_plain_html(page)


def test_markdown_renderer_covers_what_cards_use():
    text = "\n".join(["# Title", "", "Some `a | b` and **bold** text", "on two lines.", "", "- one `x`", "- two",
                      "", "| a | b |", "|---|---|", "| 1 \\| 2 | <3> |", "", "![plot](p.png)", "", "```python",
                      "x = 2 ** 3  # <not a heading>", "```"])
    page = markdown_to_html(text, "T & t", lambda src: "data:" + src)
    body = page.split("<body>", 1)[1]
    assert "<title>T &amp; t</title>" in page and "<h1>Title</h1>" in body
    assert "<p>Some <code>a | b</code> and <strong>bold</strong> text on two lines.</p>" in body
    assert "<ul>\n<li>one <code>x</code></li>\n<li>two</li>\n</ul>" in body
    assert "<thead><tr><th>a</th><th>b</th></tr></thead>" in body and "<td>1 | 2</td><td>&lt;3&gt;</td>" in body
    assert '<img src="data:p.png" alt="plot">' in body
    assert "<pre><code>x = 2 ** 3  # &lt;not a heading&gt;</code></pre>" in body
