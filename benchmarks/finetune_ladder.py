"""The post-training ladder on the built-in tasks, measured in one run.

From one pretrained base (by default the demo preset trained here for --base-steps on the
built-in corpus, kept in --base for the next run):

1. full SFT on the built-in tasks, held-out exact-match accuracy before and after;
2. LoRA SFT with the same data and steps (rank --lora-rank, a few percent of the parameters
   trainable), and its accuracy as a fraction of full SFT's;
3. QLoRA: the same LoRA over an int8 base;
4. DPO from the full-SFT model on the tasks' preference pairs (chosen = the right answer,
   rejected = a near miss): task accuracy and held-out preference accuracy before and after;
5. GRPO from the full-SFT model, rewarded by the tasks' checkers: task accuracy before and after.

Accuracy is the share of held-out prompts (never in any training set) whose greedy answer is
exactly right, per task. Every run lives under --out; rerunning reuses nothing but the base.

    python benchmarks/finetune_ladder.py [--base runs/demo-base] [--sft-steps 3000] [--threads 2]
                                         [--stages sft,lora,qlora,dpo,grpo]

The last line printed is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from binarylm.checkpoint import load_checkpoint, resolve_checkpoint
from binarylm.config import load_config
from binarylm.errors import BinaryLMError
from binarylm.model.lora import trainable_parameters
from binarylm.train.dpo import dpo
from binarylm.train.finetune import adapt
from binarylm.train.rlhf import grpo
from binarylm.train.sft import sft

TASKS = "arithmetic,reverse,upper,count"


def base_checkpoint(path: Path, steps: int) -> Path:
    """The checkpoint at `path`, pretraining the demo recipe on the built-in corpus first if there is none."""
    try:
        return resolve_checkpoint(path)
    except BinaryLMError:
        pass
    from binarylm.train.pretrain import pretrain

    print(f"no base at {path}: pretraining the demo recipe for {steps} steps first", flush=True)
    recipe = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    pretrain(load_config(recipe, {"train.out_dir": str(path), "train.max_steps": str(steps)}), progress=False)
    return resolve_checkpoint(path)


def stage_config(base: Path, out: Path, steps: int, args, **settings: str):
    shutil.rmtree(out, ignore_errors=True)
    overrides = {"finetune.base": str(base), "finetune.tasks": TASKS, "finetune.train_examples": "5000",
                 "finetune.test_examples": str(args.test_examples), "train.out_dir": str(out),
                 "train.max_steps": str(steps), "train.eval_every": str(steps), "train.save_every": str(steps),
                 "train.batch_size": "32", "train.warmup_steps": "30", "train.weight_decay": "0.1",
                 "train.log_every": "50", **settings}
    return load_config(None, overrides)


def run(name: str, stage, config) -> dict:
    """Run one stage; its figures plus wall time and the share of parameters it trained."""
    trainable, total = trainable_parameters(adapt(load_checkpoint(config.finetune.base).model, config))
    started = time.perf_counter()
    figures = stage(config, progress=False)
    figures.update(wall_seconds=time.perf_counter() - started, trainable_share=trainable / total)
    print(f"{name}: accuracy {figures['before_accuracy']:.3f} -> {figures['after_accuracy']:.3f}, "
          f"{figures['trainable_share']:.2%} of {total:,} parameters trained, {figures['wall_seconds']:.0f} s",
          flush=True)
    return figures


def accuracy_row(label: str, figures: dict, tasks: list[str], when: str = "after") -> str:
    cells = [f"{figures[f'{when}_accuracy_{task}']:.0%}" for task in tasks] + [f"{figures[f'{when}_accuracy']:.1%}"]
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="runs/demo-base")
    parser.add_argument("--base-steps", type=int, default=800)
    parser.add_argument("--out", default="runs/ladder")
    parser.add_argument("--sft-steps", type=int, default=3000)
    parser.add_argument("--dpo-steps", type=int, default=200)
    parser.add_argument("--grpo-steps", type=int, default=100)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--test-examples", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stages", default="sft,lora,qlora,dpo,grpo",
                        help="which rungs to run; dpo and grpo start from --out/sft, kept from an earlier run")
    parser.add_argument("--align-from", default="sft", choices=["sft", "lora", "qlora"],
                        help="the fine-tuned model dpo and grpo start from (--out/NAME)")
    parser.add_argument("--dpo-lr", default="5e-5")
    parser.add_argument("--grpo-lr", default="3e-5")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, out = base_checkpoint(Path(args.base), args.base_steps), Path(args.out)
    lora = {"train.lr": "3e-3", "finetune.lora_rank": str(args.lora_rank)}
    ladder = {  # name -> (stage, starts from the SFT model, steps, settings)
        "sft": (sft, False, args.sft_steps, {"train.lr": "1e-3"}),
        "lora": (sft, False, args.sft_steps, lora),
        "qlora": (sft, False, args.sft_steps, {**lora, "finetune.quantize_base": "int8"}),
        "dpo": (dpo, True, args.dpo_steps, {"train.lr": args.dpo_lr, "finetune.train_examples": "1000",
                                            "train.weight_decay": "0", "train.batch_size": "16"}),
        "grpo": (grpo, True, args.grpo_steps, {"train.lr": args.grpo_lr, "train.batch_size": "8",
                                               "train.weight_decay": "0", "train.warmup_steps": "5"}),
    }
    figures = {}
    for name, (stage, after_sft, steps, settings) in ladder.items():
        if name in args.stages.split(","):
            start = resolve_checkpoint(out / args.align_from) if after_sft else base  # kept from an earlier run
            stage_out = out / (name if not after_sft or args.align_from == "sft" else f"{name}-from-{args.align_from}")
            figures[name] = run(name, stage, stage_config(start, stage_out, steps, args, **settings))
    report(figures)


def report(figures: dict) -> None:
    tasks = TASKS.split(",")
    print("| model | " + " | ".join(tasks) + " | all |")
    print("|---" * (len(tasks) + 2) + "|")
    first = next(iter(figures.values()))
    print(accuracy_row("before (the stage's starting model)" if "sft" not in figures else "pretrained base",
                       figures.get("sft", first), tasks, "before"))
    for name, stage_figures in figures.items():
        print(accuracy_row(name, stage_figures, tasks))
    shares = {}
    if "sft" in figures:
        for name in ("lora", "qlora"):
            if name in figures:
                shares[name] = figures[name]["after_accuracy"] / max(figures["sft"]["after_accuracy"], 1e-9)
                print(f"{name} trains {figures[name]['trainable_share']:.2%} of the parameters and reaches "
                      f"{shares[name]:.1%} of full SFT's accuracy")
    for name in ("dpo", "grpo"):
        if name in figures:
            extra = (f"; held-out preference accuracy {figures[name]['before_preference_accuracy']:.1%} -> "
                     f"{figures[name]['after_preference_accuracy']:.1%}") if name == "dpo" else ""
            print(f"{name} from the SFT model: task accuracy {figures[name]['before_accuracy']:.1%} -> "
                  f"{figures[name]['after_accuracy']:.1%}{extra}")
    print(json.dumps({"share_of_full_sft": shares, **figures}))


if __name__ == "__main__":
    main()
