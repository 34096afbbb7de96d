"""`binarylm eval`: every evaluation of one checkpoint, its figures written next to it.

    held-out text    the run's own validation shards: loss, perplexity, bits per byte, and xz -9e
    --text FILE      the same figures on any text file, read with a sliding window
    --task NAME=PATH a standard benchmark from its local file (hellaswag, arc, mmlu, piqa,
                     winogrande, gsm8k; eval/formats.py)
    --custom YAML    a task described in YAML (eval/custom.py)
    --builtin TASKS  the built-in verifiable tasks' held-out prompts (data/synthetic.py)

Each task writes CKPT/eval/NAME.json ({"task", "metrics", "chance", ...}) and every example's
output to CKPT/eval/NAME.samples.jsonl; held-out text goes to CKPT/eval.json as before.
`binarylm report` reads them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from binarylm.checkpoint import Checkpoint, load_checkpoint
from binarylm.data.shards import TokenShards, WindowLoader
from binarylm.errors import BinaryLMError
from binarylm.eval.analysis import analysis_markdown, save_records
from binarylm.eval.custom import CustomTask, load_custom_task
from binarylm.eval.formats import read_benchmark
from binarylm.eval.items import ChoiceItem
from binarylm.eval.lm import bits_per_byte, text_metrics, xz_bits_per_byte
from binarylm.eval.tasks import TaskResult, evaluate_builtin, evaluate_choices, evaluate_generation
from binarylm.files import write_json_atomically

EVAL_BATCH = 8


@dataclass
class EvalPlan:
    """What `binarylm eval` runs on one checkpoint (see the module docstring)."""

    held_out: bool = False
    texts: list[str] = field(default_factory=list)
    benchmarks: dict[str, str] = field(default_factory=dict)  # name -> data file
    custom: list[str] = field(default_factory=list)  # YAML files
    builtin: list[str] = field(default_factory=list)  # built-in task names
    few_shot: int | None = None  # None: each task's own default (0 for benchmarks)
    limit: int = 0  # evaluate only the first N examples of each task (0: all)
    seed: int = 0
    stride: int | None = None
    max_tokens: int = 0  # held-out text: at most this many tokens (0: all)
    builtin_examples: int = 50  # held-out prompts per built-in task
    worst: int = 5  # worst examples printed per task


def run_plan(path: str | Path, plan: EvalPlan, device: str = "cpu", show=print) -> dict:
    """Run every evaluation in `plan` on the checkpoint at `path`; {name: figures}, each also written to disk."""
    saved = load_checkpoint(path, device=device)
    model, tokenizer = saved.model.eval(), saved.tokenizer
    results: dict[str, dict] = {}
    if plan.held_out:
        results["held_out"] = evaluate_checkpoint(saved.path, plan.max_tokens, device, saved=saved)
    for text_path in plan.texts:
        metrics = text_metrics(model, tokenizer, _read_text(text_path), plan.stride)
        figures = {"metrics": metrics, "data": str(text_path), "stride": plan.stride or "half the context"}
        results[f"text:{Path(text_path).name}"] = _write_task(saved.path, f"text-{Path(text_path).stem}", figures)
    for name, result, extra in _task_results(model, tokenizer, plan):
        figures = {**extra, "metrics": result.metrics, "chance": result.metrics.get("chance")}
        results[name] = _write_task(saved.path, name, figures, result)
        show(analysis_markdown(result, plan.worst))
    return results


def _task_results(model, tokenizer, plan: EvalPlan):
    """(name, TaskResult, facts) for each benchmark, custom and built-in task in the plan, one at a time."""
    for name, data in plan.benchmarks.items():
        items = read_benchmark(name, data)
        few_shot = plan.few_shot or 0
        facts = {"data": str(data), "few_shot": few_shot}
        yield name, _evaluate_items(model, tokenizer, name, items, plan.limit, few_shot, None, plan.seed), facts
    for yaml_path in plan.custom:
        task = load_custom_task(yaml_path)
        few_shot = task.few_shot if plan.few_shot is None else plan.few_shot
        facts = {"data": str(yaml_path), "few_shot": few_shot}
        yield task.name, _evaluate_items(model, tokenizer, task.name, list(task.items), plan.limit, few_shot, task,
                                         plan.seed), facts
    if plan.builtin:
        result = evaluate_builtin(model, tokenizer, plan.builtin, plan.builtin_examples, seed=plan.seed)
        yield "builtin", result, {"tasks": plan.builtin}


WHOLE_REPLY = r"(?s)^\s*(.*?)\s*$"  # a custom task's exact_match compares the whole reply, trimmed


def _evaluate_items(model, tokenizer, name: str, items: list, limit: int, few_shot: int, task: CustomTask | None,
                    seed: int):
    """Evaluate the first `limit` items (all with 0); few-shot examples come from all of them."""
    if not items:
        raise BinaryLMError(f"the task {name} has no examples to evaluate")
    evaluated = _limited(items, limit)
    if isinstance(items[0], ChoiceItem):
        return evaluate_choices(model, tokenizer, evaluated, few_shot=few_shot, pool=items, seed=seed, name=name)
    regex = None if task is None else task.regex if task.metric == "regex" else WHOLE_REPLY
    max_new_tokens = task.max_new_tokens if task is not None and task.max_new_tokens else 256
    return evaluate_generation(model, tokenizer, evaluated, few_shot=few_shot, pool=items, seed=seed, regex=regex,
                               max_new_tokens=min(max_new_tokens, model.config.context_length // 2), name=name)


def _write_task(checkpoint_dir: Path, name: str, figures: dict, result: TaskResult | None = None) -> dict:
    folder = checkpoint_dir / "eval"
    folder.mkdir(exist_ok=True)
    figures = {"task": name, "checkpoint": str(checkpoint_dir), **figures}
    write_json_atomically(folder / f"{_file_name(name)}.json", figures)
    if result is not None:
        save_records(result, folder / f"{_file_name(name)}.samples.jsonl")
    return figures


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _limited(items: list, limit: int) -> list:
    return items[:limit] if limit else items


def _read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise BinaryLMError(f"--text {path}: no such file; give a text file to measure bits per byte on")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BinaryLMError(f"--text {path} is not UTF-8 text ({error}); save it as UTF-8") from None


def evaluate_checkpoint(path: str | Path, max_tokens: int = 0, device: str = "cpu",
                        saved: Checkpoint | None = None) -> dict:
    """Held-out figures for the checkpoint at `path` (already loaded as `saved`, if given), also in its eval.json."""
    saved = saved or load_checkpoint(path, device=device)
    val = _validation_shards(saved.path)
    figures = evaluate_held_out(saved.model, saved.tokenizer, val, max_tokens, torch.device(device))
    figures["checkpoint"] = str(saved.path)
    write_json_atomically(saved.path / "eval.json", figures)
    return figures


def evaluate_held_out(model, tokenizer, val: TokenShards, max_tokens: int, device: torch.device) -> dict:
    """Model and xz bits per byte on the same held-out bytes (non-overlapping context windows)."""
    context = model.config.context_length
    loader = WindowLoader(val, context, EVAL_BATCH)
    batches = loader.num_windows // EVAL_BATCH if not max_tokens else max(1, max_tokens // (context * EVAL_BATCH))
    if batches == 0:
        raise BinaryLMError(f"the held-out text ({len(val)} tokens) is shorter than {EVAL_BATCH} context windows")
    result = bits_per_byte(model, tokenizer, loader.eval_batches(EVAL_BATCH, batches), device, keep_text=True)
    xz = xz_bits_per_byte(result.pop("text"))
    return {
        "loss": result["loss"],
        "perplexity": math.exp(min(result["loss"], 50.0)),
        "bits_per_byte": result["bits_per_byte"],
        "xz_bits_per_byte": xz,
        "beats_xz": result["bits_per_byte"] < xz,
        "tokens": result["tokens"],
        "bytes": result["bytes"],
    }


def _validation_shards(checkpoint_dir: Path) -> TokenShards:
    data_dir = checkpoint_dir.parent / "data"
    if not (data_dir / "val.json").is_file():
        raise BinaryLMError(
            f"no held-out shards at {data_dir} (they are written by `binarylm pretrain`); "
            "evaluate a checkpoint inside its run directory"
        )
    return TokenShards.open(data_dir, "val")
