"""Pretraining: the loss falls, resume is exact, two processes equal one, checkpoints round-trip."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from binarylm import checkpoint
from binarylm.config import load_config
from binarylm.data.sources import stdlib_files
from binarylm.errors import BinaryLMError
from binarylm.train.monitor import read_metrics
from binarylm.train.pretrain import pretrain

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Forty standard-library files: enough for a tokenizer, shards and a few dozen steps."""
    folder = tmp_path_factory.mktemp("corpus")
    for path in stdlib_files("train")[100:140]:
        shutil.copy(path, folder / path.name)
    return folder


def tiny_overrides(corpus: Path, out_dir: Path, **extra) -> dict[str, str]:
    settings = {
        "model.preset": "tiny", "model.context_length": "32", "data.inputs": str(corpus),
        "data.tokenizer_vocab_size": "400", "train.out_dir": str(out_dir), "train.batch_size": "4",
        "train.max_steps": "12", "train.warmup_steps": "3", "train.log_every": "1", "train.eval_every": "6",
        "train.eval_batches": "2", "train.save_every": "6", "train.lr": "3e-3", "train.threads": "1",
    }
    settings.update({key.replace("__", "."): str(value) for key, value in extra.items()})
    return settings


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


def test_loss_decreases(corpus, tmp_path):
    config = load_config(None, tiny_overrides(corpus, tmp_path / "run", train__max_steps=40, train__eval_every=40))
    metrics = pretrain(config, progress=False)
    losses = train_losses(tmp_path / "run")
    assert sum(list(losses.values())[-5:]) / 5 < losses[1] - 0.6  # from ln(400) = 5.99 at random init
    assert metrics["step"] == 40 and metrics["val_loss"] < losses[1]
    assert (tmp_path / "run" / "latest").read_text().strip() == "ckpt-000040"


def test_a_llama_style_mixture_of_experts_pretrains_and_reports_expert_usage(corpus, tmp_path):
    overrides = tiny_overrides(corpus, tmp_path / "run", model__preset="llama-tiny", model__n_experts=3,
                               model__context_length=32, train__max_steps=6)
    metrics = pretrain(load_config(None, overrides), progress=False)
    logged = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert len(logged[-1]["expert_usage"]) == 2 and len(logged[-1]["expert_usage"][0]) == 3
    assert 1.0 <= logged[-1]["expert_max_load"] <= 3.0
    saved = checkpoint.load_checkpoint(tmp_path / "run")
    assert saved.config.model.n_experts == 3 and saved.config.model.norm == "rmsnorm"
    assert metrics["val_loss"] < logged[0]["loss"]


def test_killed_run_resumes_with_exactly_the_same_losses(corpus, tmp_path):
    settings = tiny_overrides(corpus, tmp_path / "run", model__dropout="0.1", train__grad_accum="2")
    pretrain(load_config(None, settings), progress=False)
    uninterrupted = train_losses(tmp_path / "run")
    final = checkpoint.load_checkpoint(tmp_path / "run").model.state_dict()

    # The same run, killed right after its step-6 checkpoint: later files never existed.
    shutil.rmtree(tmp_path / "run" / "ckpt-000012")
    (tmp_path / "run" / "latest").write_text("ckpt-000006\n")
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if json.loads(line)["step"] <= 6))

    pretrain(load_config(None, settings), resume=True, progress=False)
    resumed = train_losses(tmp_path / "run")
    assert [resumed[s] for s in range(7, 13)] == [uninterrupted[s] for s in range(7, 13)]
    again = checkpoint.load_checkpoint(tmp_path / "run").model.state_dict()
    assert all(torch.equal(final[name], again[name]) for name in final)


def test_fresh_run_refuses_to_overwrite_checkpoints(corpus, tmp_path):
    settings = tiny_overrides(corpus, tmp_path / "run", train__max_steps=2)
    pretrain(load_config(None, settings), progress=False)
    with pytest.raises(BinaryLMError, match="--resume"):
        pretrain(load_config(None, settings), progress=False)


def test_resume_without_a_checkpoint_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(BinaryLMError, match="no checkpoint to resume from"):
        pretrain(load_config(None, tiny_overrides(corpus, tmp_path / "none")), resume=True, progress=False)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(corpus, tmp_path):
    common = tiny_overrides(corpus, tmp_path / "one", train__max_steps=6, train__save_every=6)
    one = load_config(None, {**common, "train.batch_size": "4"})
    pretrain(one, progress=False)

    two_dir = tmp_path / "two"
    shutil.copytree(tmp_path / "one" / "data", two_dir / "data")  # same tokenizer and shards
    args = [f"--{key}={value}" for key, value in {**common, "train.batch_size": "2",
                                                  "train.out_dir": str(two_dir)}.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "binarylm", "pretrain", "--quiet", *args],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert launched.returncode == 0, launched.stderr[-4000:]
    single, double = train_losses(tmp_path / "one"), train_losses(two_dir)
    assert list(single) == list(double) == list(range(1, 7))
    assert all(abs(single[s] - double[s]) < 1e-4 for s in single)
    a = checkpoint.load_checkpoint(tmp_path / "one").model.state_dict()
    b = checkpoint.load_checkpoint(two_dir).model.state_dict()
    assert all(torch.allclose(a[name], b[name], atol=1e-5) for name in a)


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    pretrain(load_config(None, tiny_overrides(corpus, run_dir, train__max_steps=30)), progress=False)
    return run_dir


def test_eval_reports_bits_per_byte_beside_xz(trained_run):
    from binarylm.eval.run import evaluate_checkpoint

    figures = evaluate_checkpoint(trained_run, max_tokens=2048)
    assert 0 < figures["bits_per_byte"] < 8 and 0 < figures["xz_bits_per_byte"] < 8
    assert figures["beats_xz"] == (figures["bits_per_byte"] < figures["xz_bits_per_byte"])
    assert figures["tokens"] >= 2048 - 32 * 8 and figures["bytes"] > figures["tokens"]
    assert json.loads((trained_run / "ckpt-000030" / "eval.json").read_text())["tokens"] == figures["tokens"]


def test_xz_baseline_is_what_xz_gives():
    from binarylm.eval.lm import xz_bits_per_byte

    assert xz_bits_per_byte(b"a" * 100_000) < 0.05
    assert 7.9 < xz_bits_per_byte(os.urandom(50_000)) < 8.2


def test_report_has_figures_samples_and_plot(trained_run):
    from binarylm.eval.report import write_report

    evaluation = {"bits_per_byte": 2.5, "xz_bits_per_byte": 1.5, "loss": 3.0, "perplexity": 20.1,
                  "tokens": 1000, "bytes": 3000}
    report = write_report(trained_run, "Test run", {"model": "tiny"}, evaluation, [("def ", "f(x):\n")])
    text = report.read_text()
    assert "does not beat `xz -9e`" in text and "**2.5000**" in text and "def f(x):" in text
    assert (trained_run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_generate_command_streams_a_completion(trained_run, capsys):
    from binarylm.cli import main

    assert main(["generate", "--checkpoint", str(trained_run), "def ", "--max-new-tokens", "10", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def ") and "tokens]" in captured.err
    long_prompt = "x = 1\n" * 200
    assert main(["generate", "--checkpoint", str(trained_run), long_prompt]) == 2
    assert "--truncate-prompt left" in capsys.readouterr().err


def test_cli_errors_for_missing_corpus_checkpoint_and_typos(tmp_path, capsys):
    from binarylm.cli import main

    assert main(["pretrain", "--data.inputs", str(tmp_path / "nope"), "--train.out_dir", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["pretrain", "--train.max_step", "3"]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["pretrain", "--data.inputs", str(empty), "--train.out_dir", str(tmp_path / "r2")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "r2" / "latest").exists()


def test_tensorboard_reads_our_event_files(trained_run):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = event_accumulator.EventAccumulator(str(trained_run / "tensorboard"))
    accumulator.Reload()
    assert {"train/loss", "train/lr", "val/bits_per_byte"} <= set(accumulator.Tags()["scalars"])
    losses = {event.step: event.value for event in accumulator.Scalars("train/loss")}
    assert losses[1] == pytest.approx(train_losses(trained_run)[1], rel=1e-6)
