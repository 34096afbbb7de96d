"""`binarylm demo`: the whole path on built-in data, inside a wall-clock budget.

tokenizer -> token shards -> pretraining -> held-out evaluation against xz -> samples
          -> post-training (SFT, then DPO, on the built-in tasks) -> report.

The pretraining budget is split by measurement: a few timed optimizer steps tell how
many steps fit in the time left after preparing the data and before evaluating, and
the learning-rate schedule is set to end exactly there. Post-training takes its share
of the budget (`post_minutes`, by default 30%; 0 skips it): two thirds for supervised fine-tuning on the
built-in verifiable tasks, one third for DPO on their preference pairs, with the
held-out task accuracy measured before, between and after.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from binarylm import checkpoint
from binarylm.config import load_config
from binarylm.data.prepare import prepare_corpus
from binarylm.errors import BinaryLMError
from binarylm.eval.report import report_card, write_report
from binarylm.eval.run import evaluate_held_out
from binarylm.infer.generate import GenerationConfig, generate
from binarylm.model import Transformer
from binarylm.train.optim import build_optimizer
from binarylm.train.pretrain import pretrain

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
PROMPTS = ("def ", "import os\n\n\nclass ", "    for i in range(")
SAMPLE_TOKENS = 80
EVAL_TOKENS = 262_144  # held-out tokens scored at the end (about 1 MB of text)
RESERVE_SECONDS = 25  # samples, report and slack


POST_TASKS = ["arithmetic", "reverse", "upper", "count"]
SFT_STEPS, DPO_STEPS = 600, 150  # upper bounds: the minutes given cut them short on a slow machine


def run_demo(minutes: float = 10.0, out_dir: str = "runs/demo", progress: bool = True,
             post_minutes: float | None = None) -> Path:
    """The whole demo in about `minutes`, of which `post_minutes` (default: 30%) go to post-training."""
    started = time.perf_counter()
    post_minutes = 0.3 * minutes if post_minutes is None else post_minutes
    if not 0 <= post_minutes < minutes:
        raise BinaryLMError(f"--post-minutes {post_minutes} must be at least 0 and below --minutes {minutes}")
    pretrain_minutes = minutes - post_minutes
    config = load_config(RECIPE if RECIPE.is_file() else None, {"train.out_dir": out_dir, "model.preset": "demo"})
    run_dir = Path(out_dir)
    _clear_previous_run(run_dir)
    tokenizer, train_shards, val_shards = prepare_corpus(config.data, run_dir / "data", progress=progress)
    config.model.vocab_size = tokenizer.vocab_size
    step_seconds = _seconds_per_step(config)
    eval_seconds = step_seconds * EVAL_TOKENS / (config.train.batch_size * config.model.context_length) / 3
    train_seconds = pretrain_minutes * 60 - (time.perf_counter() - started) - eval_seconds - RESERVE_SECONDS
    steps = int(train_seconds / step_seconds)
    if steps < 20:
        raise BinaryLMError(f"a {minutes}-minute budget leaves time for only {steps} pretraining steps here; "
                            "give --minutes more")
    train = config.train
    train.max_steps, train.max_minutes = steps, train_seconds / 60
    train.eval_every = train.save_every = max(1, steps // 4)
    _say(progress, f"{step_seconds:.2f} s per step: training for {steps} steps (~{train_seconds / 60:.1f} min)")
    metrics = pretrain(config, progress=progress)
    saved = checkpoint.load_checkpoint(run_dir)
    evaluation = evaluate_held_out(saved.model, saved.tokenizer, val_shards, EVAL_TOKENS, torch.device("cpu"))
    samples = _samples(saved)
    post_training = _post_train(saved.path, run_dir, post_minutes, progress) if post_minutes > 0 else None
    facts = _facts(saved, metrics, train_shards, started)
    report = write_report(run_dir, "BinaryLM demo run", facts, evaluation, samples, post_training)
    report_card([run_dir])  # the same figures as a card with plots, markdown and HTML (binarylm report)
    return report


def _post_train(base: Path, run_dir: Path, minutes: float, progress: bool) -> list[dict]:
    """SFT on the built-in tasks from the pretrained checkpoint, then DPO from the SFT model; each stage's
    figures (task accuracy before and after) for the report."""
    from binarylm.train.dpo import dpo
    from binarylm.train.sft import sft

    stages = []
    for stage, run, share, steps, settings in (
        (sft, "sft", 2 / 3, SFT_STEPS, {"train.lr": "1e-3", "finetune.train_examples": "5000"}),
        (dpo, "dpo", 1 / 3, DPO_STEPS, {"train.lr": "1e-5", "finetune.train_examples": "500"}),
    ):
        out = run_dir / run
        shutil.rmtree(out, ignore_errors=True)
        config = load_config(None, {"finetune.base": str(base), "finetune.tasks": ",".join(POST_TASKS),
                                    "train.out_dir": str(out), "train.max_steps": str(steps),
                                    "train.max_minutes": str(minutes * share), "train.batch_size": "32",
                                    "train.eval_every": str(steps), "train.save_every": str(steps),
                                    "train.warmup_steps": "20", "train.weight_decay": "0", **settings})
        _say(progress, f"post-training: {run} from {base} (at most {minutes * share:.1f} min)")
        stages.append({"stage": run, **stage(config, progress=progress)})
        base = checkpoint.resolve_checkpoint(out)
    return stages


def _clear_previous_run(run_dir: Path) -> None:
    """Start the training afresh but keep the prepared data, which is reused when unchanged."""
    for path in checkpoint.list_checkpoints(run_dir):
        shutil.rmtree(path)
    for name in ("latest", "metrics.jsonl", "report.md", "report.json", "loss.png", "card.md", "card.html",
                 "card-loss.png", "card-lr.png"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)


def _seconds_per_step(config) -> float:
    """Time a few optimizer steps of the demo model on random tokens."""
    torch.manual_seed(0)
    model = Transformer(config.model)
    optimizer = build_optimizer(model, config.train)
    shape = (config.train.batch_size, config.model.context_length)
    times = []
    for _ in range(8):
        ids = torch.randint(0, config.model.vocab_size, shape)
        begin = time.perf_counter()
        _, loss = model(ids, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - begin)
    return sorted(times[4:])[1] * 1.03  # after warm-up (first allocations), plus logging and checkpoints


def _samples(saved) -> list[tuple[str, str]]:
    settings = GenerationConfig(max_new_tokens=SAMPLE_TOKENS, temperature=0.7, top_k=40, seed=1)
    return [(prompt, generate(saved.model, saved.tokenizer, prompt, settings).text) for prompt in PROMPTS]


def _facts(saved, metrics: dict, train_shards, started: float) -> dict[str, str]:
    model, config = saved.model, saved.config
    seconds = metrics["elapsed_seconds"]
    return {
        "model": f"{model.num_parameters() / 1e6:.2f}M parameters ({config.model.n_layer} layers, "
                 f"d_model {config.model.d_model}, {config.model.n_head} heads, context {config.model.context_length})",
        "tokenizer": f"byte-level BPE, {saved.tokenizer.vocab_size} ids, trained on the training files",
        "data": f"the Python standard library's source, {len(train_shards):,} training tokens",
        "training": f"{metrics['step']} steps, {metrics['tokens_seen']:,} tokens in {seconds / 60:.1f} min "
                    f"({metrics['tokens_seen'] / seconds:,.0f} tokens/s, "
                    f"{model.flops_per_token() / 1e6:.1f} MFLOP/token)",
        "validation loss in training": f"{metrics['val_loss']:.4f} nats/token (on the first "
                                       f"{config.train.eval_batches * config.train.batch_size} held-out windows only)",
        "total demo time": f"{(time.perf_counter() - started) / 60:.1f} min",
        "checkpoint": str(saved.path),
    }


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, flush=True)
