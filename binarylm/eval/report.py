"""A run's report card: markdown with the loss curve, evaluation figures, throughput and samples."""

from __future__ import annotations

import logging
from pathlib import Path

from binarylm.train.monitor import read_metrics

log = logging.getLogger(__name__)


def plot_loss_curve(run_dir: Path, path: Path) -> bool:
    """Train and validation loss against tokens seen, as a PNG; False when matplotlib or the metrics are missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'binarylm[eval]'), so the report has no plot")
        return False
    records = read_metrics(run_dir)
    train = [(r["tokens"], r["loss"]) for r in records if r["split"] == "train"]
    val = [(r["tokens"], r["loss"]) for r in records if r["split"] == "val"]
    if not train:
        return False
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    axes.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        axes.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    axes.set_xlabel("tokens seen")
    axes.set_ylabel("cross-entropy (nats / token)")
    axes.set_title("Loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def post_training_table(stages: list[dict]) -> list[str]:
    """Markdown: held-out task accuracy per task, before post-training and after each stage."""
    tasks = sorted(key[len("before_accuracy_"):] for key in stages[0] if key.startswith("before_accuracy_"))
    header = ["task", "before (pretrained)", *(f"after {stage['stage']}" for stage in stages)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in [*tasks, ""]:
        suffix = f"_{task}" if task else ""
        cells = [task or "**all**", f"{stages[0][f'before_accuracy{suffix}']:.0%}"]
        cells += [f"{stage[f'after_accuracy{suffix}']:.0%}" for stage in stages]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(run_dir: Path, title: str, facts: dict[str, str], evaluation: dict,
                 samples: list[tuple[str, str]], post_training: list[dict] | None = None) -> Path:
    """runs/NAME/report.md with a plot beside it."""
    has_plot = plot_loss_curve(run_dir, run_dir / "loss.png")
    verdict = "beats" if evaluation["bits_per_byte"] < evaluation["xz_bits_per_byte"] else "does not beat"
    lines = [f"# {title}", ""]
    lines += [f"- **{name}**: {value}" for name, value in facts.items()]
    lines += ["", "## Held-out evaluation", "",
              f"On {evaluation['bytes']:,} bytes ({evaluation['tokens']:,} tokens) of held-out text the model "
              f"{verdict} `xz -9e`.", "",
              "| measure | model | xz -9e |", "|---|---|---|",
              f"| bits per byte | **{evaluation['bits_per_byte']:.4f}** | {evaluation['xz_bits_per_byte']:.4f} |",
              f"| loss (nats / token) | {evaluation['loss']:.4f} | |",
              f"| perplexity | {evaluation['perplexity']:.2f} | |", ""]
    if has_plot:
        lines += ["## Loss curve", "", "![loss curve](loss.png)", ""]
    lines += ["## Samples", ""]
    for prompt, completion in samples:
        lines += [f"Prompt `{prompt.strip() or '(empty)'}`:", "", "```python", prompt + completion, "```", ""]
    if post_training:
        lines += ["## Post-training on the built-in tasks", "",
                  "Exact-match accuracy of greedy answers on held-out prompts (never seen in training):", "",
                  *post_training_table(post_training), ""]
        for stage in post_training:
            lines.append(f"- {stage['stage']}: {stage['step']} steps in {stage['elapsed_seconds'] / 60:.1f} min")
        lines.append("")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
