"""Report cards: one page that says what a run was and how good its model is.

A card is drawn from nothing but the run directory, so any run can have one at any time:

    configuration   the model's shape and parameter count (config.json) and the train settings
    training        the data's size, tokens seen, wall time, throughput, compute, final losses (metrics.jsonl)
    curves          train and validation loss against tokens, the learning rate against steps (PNGs)
    evaluation      bits per byte beside `xz -9e` (eval.json), task results beside chance (eval/<task>.json)
    samples         what the model wrote, when the run kept any (the demo's report.json)

Why every evaluation row carries a baseline: a figure alone does not say whether it is good.
1.8 bits per byte means little until `xz -9e` needs 2.1 on the same bytes (the model has
then learned more about the text than a compressor finds in its repetitions), and 31% on a
four-way multiple-choice task looks different beside the 25% that guessing gets.

Several runs give one card with a column per run and one plot with a line per run. The card
is written twice: markdown with the PNGs beside it, and one HTML file that needs nothing else
(the same PNGs embedded as base64 data URIs, CSS in the page, no JavaScript), produced by the
small markdown renderer at the end of this file. The demo's report.md (`write_report`) is
built from the same tables and plots.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from binarylm.checkpoint import LATEST, list_checkpoints
from binarylm.errors import BinaryLMError
from binarylm.files import write_atomically, write_json_atomically
from binarylm.train.monitor import read_metrics

log = logging.getLogger(__name__)

MISSING = "—"
REPORT_DATA = "report.json"  # the demo report's figures and samples, kept for later cards
TASKS_COMMAND = "binarylm eval --checkpoint {checkpoint} --task NAME=PATH (or --custom TASK.yaml, --builtin TASKS)"


# ------------------------------------------------------------------ reading a run


@dataclass
class ModelSize:
    """Parameter counts (a tied head counts once) and training FLOPs per token of a model config."""

    params: int
    non_embedding: int
    flops_per_token: int


@dataclass
class RunData:
    """Everything a card shows about one run directory, read once; a missing piece stays empty."""

    name: str
    path: Path
    records: list[dict]  # metrics.jsonl
    checkpoint: Path | None = None  # the newest checkpoint
    config: dict = field(default_factory=dict)  # its config.json
    size: ModelSize | None = None
    final: dict = field(default_factory=dict)  # its metrics.json: the figures when training stopped
    evaluation: dict | None = None  # eval.json (`binarylm eval`) or the figures the demo report kept
    tasks: list[dict] = field(default_factory=list)  # eval/<task>.json of the newest checkpoint that has them
    samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, completion)
    post_training: list[dict] = field(default_factory=list)  # per stage: task accuracy before and after
    data: dict = field(default_factory=dict)  # data/train.json: the size of the training set
    problems: list[str] = field(default_factory=list)  # files that were there but could not be read

    def series(self, split: str, key: str, x_key: str) -> tuple[list[float], list[float]]:
        """(x, y) of `key` over the records of `split` that hold both."""
        points = [(r[x_key], r[key]) for r in self.records if r.get("split") == split and key in r and x_key in r]
        return [x for x, _ in points], [y for _, y in points]

    def last(self, split: str, key: str) -> float | None:
        values = self.series(split, key, "step")[1]
        return values[-1] if values else None

    def setting(self, section: str, key: str) -> Any:
        return self.config.get(section, {}).get(key)

    @property
    def counts_tokens(self) -> bool:
        return any("tokens" in r for r in self.records if r.get("split") == "train")

    @property
    def steps(self) -> int | None:
        steps = [r["step"] for r in self.records if "step" in r]
        return max(steps) if steps else self.final.get("step")

    @property
    def tokens_seen(self) -> int | None:
        tokens = [r["tokens"] for r in self.records if "tokens" in r]
        return max(tokens) if tokens else self.final.get("tokens_seen")

    @property
    def wall_seconds(self) -> float | None:
        """Training time: the checkpoint's (which spans resumed processes), else the last record's clock."""
        if "elapsed_seconds" in self.final:
            return self.final["elapsed_seconds"]
        times = [r["time"] for r in self.records if "time" in r]
        return max(times) if times else None

    @property
    def tokens_per_second(self) -> float | None:
        """The median of the logged rates (the first step, with its warm-up, left out), else tokens / time."""
        rates = [r["tokens_per_sec"] for r in self.records if "tokens_per_sec" in r and r.get("step", 0) > 1]
        if rates:
            return statistics.median(rates)
        if self.tokens_seen and self.wall_seconds:
            return self.tokens_seen / self.wall_seconds
        return None


def load_run(path: str | Path) -> RunData:
    """Read a run directory (or one checkpoint inside it, which then stands for the run)."""
    path = Path(path)
    if not path.is_dir():
        raise BinaryLMError(f"run directory {path} does not exist; give the train.out_dir of a run")
    checkpoint = None
    if (path / "config.json").is_file() and not (path / "metrics.jsonl").is_file():
        path, checkpoint = path.parent, path
    run = RunData(path.name, path, read_metrics(path))
    run.checkpoint = checkpoint or _newest_checkpoint(path)
    if run.checkpoint is not None:
        _read_checkpoint(run, run.checkpoint)
    _read_report_data(run)
    run.data = _read_json(run, path / "data" / "train.json") or {}
    return run


def _newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, else the highest-numbered one."""
    named = run_dir / (run_dir / LATEST).read_text().strip() if (run_dir / LATEST).is_file() else None
    if named is not None and named.is_dir():
        return named
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _read_checkpoint(run: RunData, checkpoint: Path) -> None:
    run.config = _read_json(run, checkpoint / "config.json") or {}
    run.final = _read_json(run, checkpoint / "metrics.json") or {}
    run.size = _model_size(run)
    evaluated = _newest_with(run, checkpoint, "eval.json")
    if evaluated:
        run.evaluation = _read_json(run, evaluated / "eval.json")
        if run.evaluation is not None and evaluated != checkpoint:
            run.evaluation["checkpoint"] = str(evaluated)
    with_tasks = _newest_with(run, checkpoint, "eval/*.json")
    if with_tasks:
        run.tasks = [t for t in (_read_task(run, f) for f in sorted(with_tasks.glob("eval/*.json"))) if t]
    if "before_accuracy" in run.final:  # a fine-tuning run on the built-in tasks: named by the run, when shown
        run.post_training = [dict(run.final)]


def _newest_with(run: RunData, checkpoint: Path, pattern: str) -> Path | None:
    """`checkpoint` if it holds files matching `pattern`, else the newest checkpoint of the run that does."""
    return next((c for c in (checkpoint, *reversed(list_checkpoints(run.path))) if any(c.glob(pattern))), None)


def _read_task(run: RunData, path: Path) -> dict | None:
    values = _read_json(run, path)
    if not isinstance(values, dict) or not isinstance(values.get("metrics"), dict):
        if values is not None:
            run.problems.append(f"{path} holds no `metrics` mapping")
        return None
    return {"task": values.get("task", path.stem), "metrics": values["metrics"], "chance": values.get("chance")}


def _read_report_data(run: RunData) -> None:
    """What `write_report` kept: samples, post-training stages, and the evaluation when eval.json is absent."""
    kept = _read_json(run, run.path / REPORT_DATA) or {}
    run.samples = [(prompt, completion) for prompt, completion in kept.get("samples", [])]
    run.post_training = kept.get("post_training") or run.post_training
    if run.evaluation is None and kept.get("evaluation"):
        run.evaluation = kept["evaluation"]


def _read_json(run: RunData, path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        run.problems.append(f"{path} cannot be read ({exc})")
        return None


def _model_size(run: RunData) -> ModelSize | None:
    """Count parameters by building the model on the meta device: shapes only, no memory, no weights."""
    import torch

    from binarylm.config import config_from_dict
    from binarylm.model import Transformer

    if "model" not in run.config:
        return None
    try:
        config = config_from_dict({"model": dict(run.config["model"])}).model
    except BinaryLMError as exc:
        run.problems.append(f"{run.checkpoint}/config.json: {exc}")
        return None
    with torch.device("meta"):
        model = Transformer(config)
    return ModelSize(model.num_parameters(), model.num_parameters(non_embedding=True), model.flops_per_token())


def _unique_names(runs: list[RunData]) -> None:
    """Runs with the same folder name (ladder/sft, ladder-try/sft) are told apart by their parent."""
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.name}/{run.path.name}"


# ------------------------------------------------------------------ formatting


def fmt_count(value: float | None) -> str:
    return MISSING if value is None else f"{value:,.0f}"


def fmt_si(value: float | None) -> str:
    """A count with a unit prefix: 5.32M parameters, 1.64M tokens."""
    if value is None:
        return MISSING
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value / 1e6:.1f} MB" if value >= 1e6 else f"{value / 1e3:.1f} kB"


def fmt_number(value: float | None, digits: int = 4) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def fmt_score(value: Any, share: bool = True) -> str:
    """A task figure: fractions (when `share`) as percentages, other numbers as they are."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return MISSING if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.1%}" if share and 0 <= value <= 1 else f"{value:.4g}"


# ------------------------------------------------------------------ markdown building blocks


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table; a `|` inside a cell is escaped so that it stays in its cell."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def bullets(facts: dict[str, str]) -> list[str]:
    return [f"- **{name}**: {value}" for name, value in facts.items()]


def held_out_section(evaluations: dict[str, dict | None]) -> list[str]:
    """Bits per byte of each model beside what `xz -9e` needs for the same held-out bytes (a column per model)."""
    shown = {name: figures for name, figures in evaluations.items() if figures}
    if not shown:
        return []
    lines = ["## Held-out evaluation", "",
             "Bits per byte can be compared across tokenizers; `xz -9e` on the same bytes is the baseline "
             "(a model that does not beat a general-purpose compressor has learned little).", ""]
    for name, figures in shown.items():
        subject = "The model" if len(shown) == 1 else f"**{name}**"
        verdict = "beats" if figures["bits_per_byte"] < figures["xz_bits_per_byte"] else "does not beat"
        lines.append(f"- {subject} {verdict} `xz -9e` on {figures['bytes']:,} bytes ({figures['tokens']:,} tokens) "
                     "of held-out text.")
    rows = [
        ("bits per byte", lambda f: f"**{f['bits_per_byte']:.4f}**"),
        ("`xz -9e` bits per byte (baseline)", lambda f: f"{f['xz_bits_per_byte']:.4f}"),
        ("loss (nats / token)", lambda f: fmt_number(f.get("loss"))),
        ("perplexity", lambda f: fmt_number(f.get("perplexity"), 2)),
    ]
    if any("checkpoint" in figures for figures in shown.values()):
        rows.append(("checkpoint", lambda f: Path(f["checkpoint"]).name if "checkpoint" in f else MISSING))
    table = [[label, *(cell(figures) for figures in shown.values())] for label, cell in rows]
    return [*lines, "", *markdown_table(["measure", *shown], table), ""]


def task_section(results: dict[str, list[dict]]) -> list[str]:
    """Task results (eval/<task>.json), a column per run, beside the baseline: the score of guessing at random
    for accuracies, xz -9e for bits per byte of a text."""
    if not any(results.values()):
        return []
    keys: dict[tuple[str, str], Any] = {}  # (task, metric) -> baseline, in order of appearance
    sizes: dict[str, Any] = {}
    for tasks in results.values():
        for task in tasks:
            sizes.setdefault(task["task"], task["metrics"].get("n", task["metrics"].get("tokens")))
            for metric in _shown_metrics(task):
                keys.setdefault((task["task"], metric), _baseline(task, metric))
    rows = []
    for (task, metric), baseline in keys.items():
        cells = [_task_cell(tasks, task, metric) for tasks in results.values()]
        label = f"{task} (n={fmt_score(sizes[task])})" if sizes[task] is not None else task
        rows.append([label, metric, *cells, fmt_score(baseline, _is_share(metric))])
    return ["## Tasks", "",
            "Accuracy on multiple-choice tasks is only meaningful next to chance (1 / number of options), and "
            "bits per byte next to what `xz -9e` needs; exact match of generated answers has no such floor.", "",
            *markdown_table(["task", "metric", *results, "baseline"], rows), ""]


SHARES = ("acc", "exact_match", "extracted")  # metrics (and their _norm, _TASK variants) that are fractions
NOT_SHOWN = ("n", "chance", "xz_bits_per_byte", "tokens", "bytes")


def _is_share(metric: str) -> bool:
    return metric.startswith(SHARES)


def _shown_metrics(task: dict) -> list[str]:
    return [k for k, v in task["metrics"].items() if k not in NOT_SHOWN and not k.endswith("_stderr")
            and isinstance(v, int | float) and not isinstance(v, bool)]


def _baseline(task: dict, metric: str) -> Any:
    if metric == "bits_per_byte":
        return task["metrics"].get("xz_bits_per_byte")
    if not metric.startswith("acc"):
        return None
    chance = task.get("chance")
    if chance is None:
        chance = task["metrics"].get("chance")
    return chance.get(metric) if isinstance(chance, dict) else chance


def _task_cell(tasks: list[dict], name: str, metric: str) -> str:
    for task in tasks:
        if task["task"] == name and metric in task["metrics"]:
            share = _is_share(metric)
            stderr = task["metrics"].get(f"{metric}_stderr")
            spread = f" ± {fmt_score(stderr, share)}" if stderr is not None else ""
            return fmt_score(task["metrics"][metric], share) + spread
    return MISSING


def post_training_table(stages: list[dict]) -> list[str]:
    """Markdown: held-out task accuracy per task, before post-training and after each stage."""
    tasks = sorted({key[len("before_accuracy_"):] for stage in stages for key in stage
                    if key.startswith("before_accuracy_")})
    header = ["task", "before (pretrained)", *(f"after {stage['stage']}" for stage in stages)]
    rows = []
    for task in [*tasks, ""]:
        suffix = f"_{task}" if task else ""
        cells = [task or "**all**", _percent(stages[0].get(f"before_accuracy{suffix}"))]
        rows.append(cells + [_percent(stage.get(f"after_accuracy{suffix}")) for stage in stages])
    return markdown_table(header, rows)


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{value:.0%}"


def post_training_section(stages: list[dict], title: str = "Post-training on the built-in tasks") -> list[str]:
    if not stages:
        return []
    lines = [f"## {title}", "", "Exact-match accuracy of greedy answers on held-out prompts (never seen in training):",
             "", *post_training_table(stages), ""]
    for stage in stages:
        minutes = stage.get("elapsed_seconds", 0) / 60
        lines.append(f"- {stage['stage']}: {stage.get('step', '?')} steps in {minutes:.1f} min")
    return [*lines, ""]


def samples_section(samples: list[tuple[str, str]], title: str = "## Samples") -> list[str]:
    if not samples:
        return []
    lines = [title, ""]
    for prompt, completion in samples:
        lines += [f"Prompt `{prompt.strip() or '(empty)'}`:", "", "```python", prompt + completion, "```", ""]
    return lines


# ------------------------------------------------------------------ plots


@dataclass
class Curve:
    """One line (or, with style "o", a set of points) on a panel."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    style: str = "-"
    color: str | None = None


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    curves: list[Curve]
    log_x: bool = False
    log_y: bool = False


def draw_png(path: Path, panels: list[Panel]) -> bool:
    """Panels side by side in one PNG; False (and nothing written) without matplotlib or without data."""
    panels = [panel for panel in panels if any(curve.xs for curve in panel.curves)]
    plt = _pyplot()
    if plt is None or not panels:
        return False
    figure, axes_row = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), dpi=110, squeeze=False)
    for axes, panel in zip(axes_row[0], panels, strict=True):
        for curve in panel.curves:
            if curve.xs:
                axes.plot(curve.xs, curve.ys, curve.style, label=curve.label, color=curve.color, linewidth=1.3)
        axes.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        axes.set_xscale("log" if panel.log_x else "linear")
        axes.set_yscale("log" if panel.log_y else "linear")
        axes.grid(alpha=0.3)
        if any(curve.label for curve in panel.curves):
            axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return True


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'binarylm[eval]'), so the report has no plots")
        return None
    return plt


def plot_losses(runs: list[RunData], path: Path) -> bool:
    """Train and validation loss of each run (one colour per run) against tokens seen (steps when not logged)."""
    x_key = "tokens" if all(run.counts_tokens for run in runs) else "step"
    curves = []
    for index, run in enumerate(runs):
        prefix = f"{run.name} " if len(runs) > 1 else ""
        curves.append(Curve(f"{prefix}train", *run.series("train", "loss", x_key), "-", f"C{index}"))
        curves.append(Curve(f"{prefix}validation", *run.series("val", "loss", x_key), "o--", f"C{index}"))
    curves = [curve for curve in curves if curve.xs]
    xlabel = "tokens seen" if x_key == "tokens" else "step"
    return draw_png(path, [Panel("Loss", xlabel, "cross-entropy (nats / token)", curves)])


def plot_learning_rate(runs: list[RunData], path: Path) -> bool:
    """The learning rate each run used at each logged step (warm-up, then the decay)."""
    labels = [run.name if len(runs) > 1 else "" for run in runs]
    curves = [Curve(label, *run.series("train", "lr", "step"), "-", f"C{i}") for i, (run, label)
              in enumerate(zip(runs, labels, strict=True))]
    return draw_png(path, [Panel("Learning-rate schedule", "step", "learning rate", curves)])


def plot_loss_curve(run_dir: Path, path: Path) -> bool:
    """Train and validation loss against tokens seen, as a PNG; False when matplotlib or the metrics are missing."""
    return plot_losses([RunData(Path(run_dir).name, Path(run_dir), read_metrics(run_dir))], path)


# ------------------------------------------------------------------ the card


def configuration_rows(run: RunData) -> list[tuple[str, str]]:
    """The model's shape and the settings that trained it."""
    model, size = run.config.get("model", {}), run.size
    if not model:
        return [("config.json", "not found")]
    heads = f"{model['n_head']}" + (f" ({model['n_kv_heads']} key-value)" if model.get("n_kv_heads") not in
                                      (None, model["n_head"]) else "")
    rows = [
        ("checkpoint", run.checkpoint.name if run.checkpoint else MISSING),
        ("parameters", f"{fmt_si(size.params)} ({fmt_si(size.non_embedding)} without embeddings)"
         if size else MISSING),
        ("layers / width / heads", f"{model['n_layer']} / {model['d_model']} / {heads}"),
        ("block", f"{model.get('norm')}, {model.get('mlp')} MLP of {model.get('d_ff')}, "
                  f"{model.get('position')} positions" + (f", {model['n_experts']} experts"
                                                          if model.get("n_experts") else "")),
        ("vocabulary", fmt_count(model["vocab_size"])),
        ("context", fmt_count(model["context_length"])),
        ("stage", _stage(run)),
    ]
    return rows + _train_settings(run.config.get("train", {}))


def _train_settings(train: dict) -> list[tuple[str, str]]:
    if not train:
        return []
    schedule = (f"{train['lr']:g} peak, {train['warmup_steps']} warm-up steps, cosine to "
                f"{train['lr'] * train['min_lr_ratio']:g} at step {train['max_steps']}")
    return [
        ("batch", f"{train['batch_size']} sequences x {train['grad_accum']} accumulation steps"),
        ("learning rate", schedule),
        ("weight decay / gradient clip", f"{train['weight_decay']} / {train['grad_clip']}"),
    ]


def _stage(run: RunData) -> str:
    base = run.setting("finetune", "base")
    if not base:
        return "pretraining"
    rank = run.setting("finetune", "lora_rank")
    return f"fine-tuning of `{base}`" + (f" (LoRA rank {rank})" if rank else "")


def training_rows(run: RunData) -> list[tuple[str, str]]:
    """What the run consumed and where its loss ended."""
    tokens, size = run.tokens_seen, run.size
    per_second = run.tokens_per_second
    compute = f"{size.flops_per_token * tokens:.2e} FLOPs".replace("e+", "e") if size and tokens else MISSING
    return [
        ("training data", _data_description(run)),
        ("steps", fmt_count(run.steps)),
        ("tokens seen", fmt_count(tokens) + _epochs(run)),
        ("wall time", fmt_duration(run.wall_seconds)),
        ("throughput", f"{per_second:,.0f} tokens/s" if per_second else "not recorded"),
        ("training compute", compute),
        ("final train loss", fmt_number(run.last("train", "loss"))),
        ("final validation loss", fmt_number(run.last("val", "loss"))),
        ("final validation bits per byte", fmt_number(run.last("val", "bits_per_byte"))),
    ]


def _data_description(run: RunData) -> str:
    if run.setting("finetune", "base"):
        files = run.setting("finetune", "data")
        if files:
            return ", ".join(f"`{f}`" for f in files)
        return (f"built-in tasks {', '.join(run.setting('finetune', 'tasks') or [])}, "
                f"{fmt_count(run.setting('finetune', 'train_examples'))} examples each")
    inputs = run.setting("data", "inputs")
    source = ", ".join(f"`{i}`" for i in inputs) if inputs else "the built-in corpus"
    if not run.data:
        return source
    return (f"{source}: {fmt_count(run.data.get('num_tokens'))} tokens, {fmt_count(run.data.get('num_documents'))} "
            f"documents, {fmt_bytes(run.data.get('num_bytes'))}")


def _epochs(run: RunData) -> str:
    total = run.data.get("num_tokens")
    if not total or not run.tokens_seen or run.setting("finetune", "base"):
        return ""
    return f" ({run.tokens_seen / total:.2f} epochs)"


def missing_hints(run: RunData) -> list[str]:
    """What this run's card lacks, each with the command that would produce it."""
    where = run.checkpoint or run.path
    hints = []
    if not run.records:
        hints.append(f"no metrics.jsonl (no curves, throughput or tokens): train with "
                     f"`binarylm pretrain --train.out_dir {run.path}`")
    if run.checkpoint is None:
        hints.append(f"no checkpoint (no configuration or evaluation): `binarylm pretrain --train.out_dir {run.path}` "
                     "writes them")
    if run.evaluation is None and run.setting("finetune", "base"):
        hints.append("no held-out bits per byte: a fine-tuning run has no held-out text of its own (`binarylm eval` "
                     "reads the shards in a pretraining run's data/; see its base's card)")
    elif run.evaluation is None:
        hints.append(f"no held-out bits per byte: `binarylm eval --checkpoint {where}`")
    if not run.tasks:
        hints.append(f"no task results in `{where}/eval/`: `{TASKS_COMMAND.format(checkpoint=where)}`")
    if not run.samples:
        hints.append(f"no saved samples (`binarylm demo` keeps them; `binarylm generate --checkpoint {where} "
                     "\"def \"` prints one)")
    return hints + run.problems


def card_markdown(runs: list[RunData], images: dict[str, str]) -> str:
    """The card's markdown: tables with a column per run, then plots, evaluations and samples."""
    names = [run.name for run in runs]
    title = names[0] if len(runs) == 1 else " vs ".join(names)
    lines = [f"# Report card: {title}", "", "Runs: " + ", ".join(f"`{run.path}`" for run in runs), ""]
    missing = [f"{run.name}: {hint}" if len(runs) > 1 else hint for run in runs for hint in missing_hints(run)]
    if missing:
        lines += ["## Missing", "", *(f"- {hint}" for hint in missing), ""]
    for heading, rows_of in (("Configuration", configuration_rows), ("Training", training_rows)):
        lines += [f"## {heading}", "", *_side_by_side(runs, rows_of), ""]
    for key, heading in (("loss", "Loss curves"), ("lr", "Learning-rate schedule")):
        if key in images:
            lines += [f"## {heading}", "", f"![{heading.lower()}]({images[key]})", ""]
    lines += held_out_section({run.name: run.evaluation for run in runs})
    lines += task_section({run.name: run.tasks for run in runs})
    lines += post_training_section([{"stage": run.name, **stage} for run in runs for stage in run.post_training])
    for run in runs:
        lines += samples_section(run.samples, "## Samples" + (f": {run.name}" if len(runs) > 1 else ""))
    return "\n".join(lines)


def _side_by_side(runs: list[RunData], rows_of: Callable[[RunData], list[tuple[str, str]]]) -> list[str]:
    """Rows from `rows_of` for each run, joined into one table with a column per run."""
    columns = [dict(rows_of(run)) for run in runs]
    labels = list(dict.fromkeys(label for column in columns for label in column))
    rows = [[label, *(column.get(label, MISSING) for column in columns)] for label in labels]
    return markdown_table(["", *(run.name for run in runs)], rows)


def report_card(run_dirs: list[Path], out: Path | None = None) -> tuple[Path, Path]:
    """Write the card for one run (or comparing several) as markdown and as self-contained HTML.

    `out` is the markdown file (default: RUN/card.md for one run, comparison.md beside several);
    the HTML goes beside it with the suffix .html, and the PNGs beside both as <stem>-loss.png
    and <stem>-lr.png. The HTML embeds the PNGs, so it can be sent on its own.
    """
    if not run_dirs:
        raise BinaryLMError("give at least one run directory for the report card")
    runs = [load_run(path) for path in run_dirs]
    _unique_names(runs)
    if out is None:
        parent = runs[0].path if len(runs) == 1 else Path(os.path.commonpath([r.path.resolve() for r in runs]))
        out = parent / ("card.md" if len(runs) == 1 else "comparison.md")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images = {}
    for key, plot in (("loss", plot_losses), ("lr", plot_learning_rate)):
        image = out.with_name(f"{out.stem}-{key}.png")
        if plot(runs, image):
            images[key] = image.name
    title = "Report card: " + " vs ".join(run.name for run in runs)
    return write_markdown_and_html(card_markdown(runs, images), out, title)


def write_markdown_and_html(text: str, path: Path, title: str) -> tuple[Path, Path]:
    """`text` to `path` (markdown) and to `path` with .html, where the images are embedded."""
    page = markdown_to_html(text, title, lambda src: embed_image(path.parent, src))
    html_path = path.with_suffix(".html")
    write_atomically(path, text.encode("utf-8"))
    write_atomically(html_path, page.encode("utf-8"))
    return path, html_path


def write_report(run_dir: Path, title: str, facts: dict[str, str], evaluation: dict,
                 samples: list[tuple[str, str]], post_training: list[dict] | None = None) -> Path:
    """runs/NAME/report.md with a plot beside it; the figures and samples are also kept in report.json,
    where a later `report_card` of the run finds them."""
    run_dir = Path(run_dir)
    has_plot = plot_loss_curve(run_dir, run_dir / "loss.png")
    lines = [f"# {title}", "", *bullets(facts), "", *held_out_section({"model": evaluation})]
    if has_plot:
        lines += ["## Loss curve", "", "![loss curve](loss.png)", ""]
    lines += samples_section(samples)
    lines += post_training_section(post_training or [])
    write_json_atomically(run_dir / REPORT_DATA, {"title": title, "facts": facts, "evaluation": evaluation,
                                                  "samples": samples, "post_training": post_training or []})
    path = run_dir / "report.md"
    write_atomically(path, "\n".join(lines).encode("utf-8"))
    return path


# ------------------------------------------------------------------ markdown -> HTML


HEADING = re.compile(r"(#{1,6}) (.*)")
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)")
BOLD = re.compile(r"\*\*(.+?)\*\*")
CELL_SPLIT = re.compile(r"(?<!\\)\|")

CSS = """
body { font-family: system-ui, sans-serif; max-width: 64rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f3f3f3; padding: 0 .2rem; border-radius: 3px; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; border-radius: 4px; }
pre code { background: none; padding: 0; }
img { max-width: 100%; }
"""


def markdown_to_html(text: str, title: str, image_source: Callable[[str], str] = lambda src: src) -> str:
    """A whole HTML page from the markdown this module writes (headings, paragraphs, bullet lists,
    tables, images on their own line, fenced code, `code` and **bold**). `image_source` maps an
    image path to the src written into the page (embed_image turns it into a data URI)."""
    body = "\n".join(_html_blocks(text.splitlines(), image_source))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def embed_image(folder: Path, src: str) -> str:
    """A PNG beside the card as a base64 data URI (the page then needs no other file); other sources unchanged."""
    path = folder / src
    if not src.endswith(".png") or not path.is_file():
        return src
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_blocks(lines: list[str], image_source: Callable[[str], str]) -> Iterator[str]:
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            yield f"<pre><code>{html.escape(chr(10).join(lines[i + 1:end]))}</code></pre>"
            i = end + 1
        elif heading := HEADING.fullmatch(line):
            level = len(heading.group(1))
            yield f"<h{level}>{_inline(heading.group(2))}</h{level}>"
            i += 1
        elif image := IMAGE.fullmatch(line.strip()):
            alt, src = html.escape(image.group(1)), html.escape(image_source(image.group(2)))
            yield f'<figure><img src="{src}" alt="{alt}"></figure>'
            i += 1
        elif line.startswith("|"):
            rows, i = _take(lines, i, lambda text: text.startswith("|"))
            yield _html_table(rows)
        elif line.startswith("- "):
            items, i = _take(lines, i, lambda text: text.startswith("- "))
            yield "<ul>\n" + "\n".join(f"<li>{_inline(item[2:])}</li>" for item in items) + "\n</ul>"
        elif not line.strip():
            i += 1
        else:
            paragraph, i = _take(lines, i, _is_paragraph_text)
            yield f"<p>{_inline(' '.join(paragraph))}</p>"


def _is_paragraph_text(line: str) -> bool:
    starts_block = line.startswith(("```", "|", "- ")) or HEADING.fullmatch(line) or IMAGE.fullmatch(line.strip())
    return bool(line.strip()) and not starts_block


def _take(lines: list[str], start: int, belongs: Callable[[str], Any]) -> tuple[list[str], int]:
    """The run of lines from `start` for which `belongs` holds, and the index after it."""
    end = start
    while end < len(lines) and belongs(lines[end]):
        end += 1
    return lines[start:end], end


def _html_table(rows: list[str]) -> str:
    cells = [[cell.strip().replace("\\|", "|") for cell in CELL_SPLIT.split(row.strip())[1:-1]] for row in rows]
    has_header = len(cells) > 1 and all(set(cell) <= set("-: ") for cell in cells[1])
    header, body = (cells[0], cells[2:]) if has_header else ([], cells)
    out = ["<table>"]
    if header:
        out.append("<thead><tr>" + "".join(f"<th>{_inline(cell)}</th>" for cell in header) + "</tr></thead>")
    out.append("<tbody>")
    out += ["<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>" for row in body]
    return "\n".join([*out, "</tbody>", "</table>"])


def _inline(text: str) -> str:
    """Escape `text` for HTML, with `code` spans and **bold** (backticks win: nothing inside them is bold)."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unmatched backtick stays a character
        parts[-2:] = [parts[-2] + "`" + parts[-1]]
    return "".join(f"<code>{html.escape(part)}</code>" if index % 2 else BOLD.sub(r"<strong>\1</strong>",
                                                                                   html.escape(part))
                   for index, part in enumerate(parts))
