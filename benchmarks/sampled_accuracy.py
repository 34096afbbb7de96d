"""Held-out accuracy of sampled answers on the built-in tasks, for several checkpoints side by side.

Greedy accuracy asks whether the likeliest answer is right. Reinforcement learning with a
checker (GRPO, PPO) maximises something else: the expected reward of answers *sampled* from the
policy, here at temperature 1. This script measures that on the held-out prompts (the same ones
`binarylm finetune` scores), with several sampling seeds per prompt, so an RL stage can be
compared with the model it started from on the quantity it optimises.

    python benchmarks/sampled_accuracy.py runs/ladder-short/sft runs/ladder-short/grpo [--seeds 16]

The last line printed is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from binarylm.checkpoint import load_checkpoint
from binarylm.data.synthetic import check, make_examples
from binarylm.train.finetune import generate_answers

TASKS = ("arithmetic", "reverse", "upper", "count")


def sampled_accuracy(path: str, prompts_per_task: int, seeds: int, temperature: float, max_new_tokens: int) -> dict:
    """Share of right sampled answers per task and over all, over `seeds` samples of every held-out prompt."""
    saved = load_checkpoint(path)
    examples = [e for task in TASKS for e in make_examples(task, prompts_per_task, split="test", seed=0)]
    right = {task: 0 for task in TASKS}
    for seed in range(seeds):
        answers = generate_answers(saved.model, saved.tokenizer, [e.prompt for e in examples], max_new_tokens,
                                   temperature=temperature, seed=1000 * seed)
        for example, answer in zip(examples, answers):
            right[example.task] += check(example.task, answer, example.answer)
    figures = {task: count / (seeds * prompts_per_task) for task, count in right.items()}
    samples = seeds * len(examples)
    figures["all"] = sum(right.values()) / samples
    figures["stderr"] = math.sqrt(figures["all"] * (1 - figures["all"]) / samples)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--seeds", type=int, default=16, help="samples per held-out prompt")
    parser.add_argument("--prompts", type=int, default=100, help="held-out prompts per task")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    print("| checkpoint | " + " | ".join(TASKS) + " | all |")
    print("|---" * (len(TASKS) + 2) + "|")
    for path in args.checkpoints:
        figures = results[path] = sampled_accuracy(path, args.prompts, args.seeds, args.temperature,
                                                   args.max_new_tokens)
        cells = [f"{figures[task]:.1%}" for task in TASKS] + [f"{figures['all']:.1%} ± {figures['stderr']:.1%}"]
        print(f"| {path} | " + " | ".join(cells) + " |", flush=True)
    print(json.dumps({"temperature": args.temperature, "seeds": args.seeds, "results": results}))


if __name__ == "__main__":
    main()
