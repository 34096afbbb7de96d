"""What every post-training stage shares: a base model, optional adapters, and the training loop.

A stage (SFT, DPO, ...) starts from `finetune.base`, a checkpoint. With `finetune.lora_rank`
the base is frozen under LoRA adapters (model/lora.py), and with `finetune.quantize_base` the
frozen base is first quantized to int8 or int4 (QLoRA). The loop is the pretraining loop's
recipe: AdamW on the trainable parameters, warmup plus cosine, gradient accumulation and
clipping, a checkpoint every `train.save_every` steps, and an exact `--resume` (optimizer,
example order and step come back from `train_state.pt`).

A stage supplies two functions: `loss(indices)`, the loss of the examples at those indices
(plus figures to log), and `evaluate()`, the figures that say how the model is doing (task
accuracy by generation for SFT). Checkpoints of a LoRA run hold the adapter alone;
`checkpoint.load_checkpoint` rebuilds the model from the base they name.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from binarylm import checkpoint
from binarylm.config import RunConfig
from binarylm.data.chat import render_chat
from binarylm.data.synthetic import TaskExample, check
from binarylm.errors import BinaryLMError
from binarylm.infer.engine import Engine
from binarylm.infer.sampling import SamplingParams
from binarylm.model import Transformer
from binarylm.model.lora import LoRAConfig, add_lora, describe_trainable, frozen_base, load_adapter
from binarylm.tokenizer import PAD, Tokenizer
from binarylm.train.distributed import pick_device
from binarylm.train.monitor import Monitor
from binarylm.train.optim import build_optimizer, learning_rate

log = logging.getLogger(__name__)

LossFunction = Callable[[list[int]], tuple[torch.Tensor, dict]]


@dataclass
class ExampleOrder:
    """A seeded, resumable walk over `count` examples: a fresh shuffle each epoch, `batch_size` at a time."""

    count: int
    batch_size: int
    seed: int
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)
    _order_epoch: int = field(default=-1, repr=False)

    def next_indices(self) -> list[int]:
        indices = []
        while len(indices) < self.batch_size:
            if self.position >= self.count:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(self.batch_size - len(indices), self.count - self.position)
            indices += self._shuffled()[self.position: self.position + take]
            self.position += take
        return indices

    def _shuffled(self) -> list[int]:
        """This epoch's order: the same for the same (seed, epoch), so a resumed run sees what it would have."""
        if self._order_epoch != self.epoch:
            self._order = list(range(self.count))
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(self._order)
            self._order_epoch = self.epoch
        return self._order

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if state["count"] != self.count:
            raise BinaryLMError(f"the run was trained on {state['count']} examples and now has {self.count}; "
                                "resume with the same finetune.* data settings")
        self.epoch, self.position = state["epoch"], state["position"]


@dataclass
class Tuning:
    """The model being post-trained and everything the loop needs around it."""

    stage: str
    config: RunConfig
    run_dir: Path
    tokenizer: Tokenizer
    model: Transformer
    device: torch.device
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    elapsed: float = 0.0
    heads: dict[str, torch.nn.Module] = field(default_factory=dict)  # small modules beside the model (a reward,
    # value or class head): trained with it, saved in each checkpoint's heads.safetensors, restored on resume

    def add_heads(self, heads: dict[str, torch.nn.Module]) -> None:
        """Train `heads` beside the model (moved to its device; no weight decay). Call before `restore`."""
        for name, head in heads.items():
            self.heads[name] = head.to(self.device).train()
            self.optimizer.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0})

    def trainable(self) -> list[torch.nn.Parameter]:
        """Every parameter the optimizer moves: the model's trainable ones, then the heads'."""
        model = [p for p in self.model.parameters() if p.requires_grad]
        return model + [p for head in self.heads.values() for p in head.parameters()]


# ------------------------------------------------------------------- set-up


def start(stage: str, config: RunConfig, resume: bool = False) -> Tuning:
    """Load the base named by finetune.base, quantize and adapt it as configured, and resume if asked."""
    train = config.train
    if train.threads:
        torch.set_num_threads(train.threads)
    run_dir = Path(train.out_dir)
    _check_run_dir(run_dir, resume)
    if not config.finetune.base:
        raise BinaryLMError(f"{stage} needs a model to start from: pass --finetune.base CHECKPOINT_OR_RUN_DIR")
    base = checkpoint.load_checkpoint(config.finetune.base)
    config.finetune.base = str(base.path.resolve())  # checkpoints of adapters find their base from anywhere
    config.model = base.config.model  # the shape is the base's, whatever the recipe says
    device = pick_device(train.device)
    torch.manual_seed(train.seed)  # the same adapter initialisation in every run of this config
    model = adapt(base.model, config).to(device)
    tuning = Tuning(stage, config, run_dir, base.tokenizer, model, device)
    tuning.optimizer = build_optimizer(model, train)
    log.info("%s: %s", stage, describe_trainable(model))
    return tuning


def adapt(model: Transformer, config: RunConfig) -> Transformer:
    """Full fine-tuning (everything trains), or LoRA adapters over a frozen (maybe quantized) base."""
    tune = config.finetune
    if tune.lora_rank <= 0:
        return model.train()
    frozen_base(model, tune.quantize_base)
    add_lora(model, LoRAConfig(rank=tune.lora_rank, alpha=tune.lora_alpha, dropout=tune.lora_dropout,
                               targets=list(tune.lora_targets)))
    return model.train()


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if not resume and checkpoint.list_checkpoints(run_dir):
        raise BinaryLMError(f"{run_dir} already holds checkpoints; pass --resume to continue that run, "
                            "or choose another --train.out_dir")
    if resume and not checkpoint.list_checkpoints(run_dir):
        raise BinaryLMError(f"{run_dir} has no checkpoint to resume from; start the run without --resume")


def restore(tuning: Tuning, order: ExampleOrder) -> None:
    """Weights (or the adapter), optimizer, example order and step from the run's latest checkpoint."""
    found = checkpoint.resolve_checkpoint(tuning.run_dir)
    if tuning.config.finetune.lora_rank > 0:
        load_adapter(found, tuning.model)
    else:
        saved = checkpoint.load_checkpoint(found, device=tuning.device)
        tuning.model.load_state_dict(saved.model.state_dict())
    checkpoint.load_heads(found, tuning.heads)
    state = checkpoint.load_train_state(found)
    tuning.optimizer.load_state_dict(state["optimizer"])
    order.load_state_dict(state["order"])
    tuning.step, tuning.elapsed = state["step"], state["elapsed"]
    log.info("resumed %s from %s at step %d", tuning.stage, found, tuning.step)


# --------------------------------------------------------------------- loop


def train(tuning: Tuning, order: ExampleOrder, loss: LossFunction, evaluate: Callable[[], dict],
          progress: bool = True) -> dict:
    """Optimize until train.max_steps (or train.max_minutes); evaluate and checkpoint on schedule."""
    settings = tuning.config.train
    monitor = Monitor(tuning.run_dir, settings.max_steps, tuning.step, progress=progress, desc=tuning.stage)
    monitor.message(f"{tuning.stage}: {describe_trainable(tuning.model)}; steps {tuning.step} -> {settings.max_steps}")
    started = time.perf_counter()
    metrics: dict = {}
    try:
        if tuning.step == 0:
            metrics.update(_evaluate(tuning, monitor, evaluate, "before"))
        while tuning.step < settings.max_steps and not _out_of_time(tuning, started):
            value, figures = _step(tuning, order, loss)
            tuning.step += 1
            monitor.advance(1, value)
            if tuning.step % settings.log_every == 0 or tuning.step == 1:
                monitor.log(tuning.step, "train", {"loss": value, "lr": learning_rate(tuning.step - 1, settings),
                                                   **figures})
            metrics["train_loss"] = value
            if tuning.step % settings.eval_every == 0 and tuning.step < settings.max_steps:
                metrics.update(_evaluate(tuning, monitor, evaluate, "val"))
            if tuning.step % settings.save_every == 0:
                _save(tuning, order, started, metrics)
        metrics.update(_evaluate(tuning, monitor, evaluate, "after"))
        metrics.update(step=tuning.step, elapsed_seconds=tuning.elapsed + time.perf_counter() - started)
        _save(tuning, order, started, metrics)
    finally:
        monitor.close()
    return metrics


def _step(tuning: Tuning, order: ExampleOrder, loss: LossFunction) -> tuple[float, dict]:
    """One optimizer step over train.grad_accum micro-batches; returns (mean loss, mean figures)."""
    settings = tuning.config.train
    torch.manual_seed(settings.seed * 1_000_003 + tuning.step)  # dropout, reproducibly on resume
    for group in tuning.optimizer.param_groups:
        group["lr"] = learning_rate(tuning.step, settings)
    total, figures = 0.0, {}
    for _ in range(settings.grad_accum):
        value, extra = loss(order.next_indices())
        (value / settings.grad_accum).backward()
        total += value.item() / settings.grad_accum
        for name, number in extra.items():
            figures[name] = figures.get(name, 0.0) + number / settings.grad_accum
    max_norm = settings.grad_clip if settings.grad_clip > 0 else float("inf")
    figures["grad_norm"] = torch.nn.utils.clip_grad_norm_(tuning.trainable(), max_norm).item()
    tuning.optimizer.step()
    tuning.optimizer.zero_grad(set_to_none=True)
    return total, figures


def _evaluate(tuning: Tuning, monitor: Monitor, evaluate: Callable[[], dict], split: str) -> dict:
    modules = [tuning.model, *tuning.heads.values()]
    for module in modules:
        module.eval()
    try:
        figures = evaluate()
    finally:
        for module in modules:
            module.train()
    monitor.log(tuning.step, split, figures)
    monitor.message(f"step {tuning.step} ({split}): " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
    return {f"{split}_{name}": value for name, value in figures.items()}


def _out_of_time(tuning: Tuning, started: float) -> bool:
    budget = tuning.config.train.max_minutes * 60
    return budget > 0 and tuning.elapsed + time.perf_counter() - started >= budget


def _save(tuning: Tuning, order: ExampleOrder, started: float, metrics: dict) -> None:
    state = {"step": tuning.step, "optimizer": tuning.optimizer.state_dict(), "order": order.state_dict(),
             "elapsed": tuning.elapsed + time.perf_counter() - started}
    checkpoint.save_checkpoint(tuning.run_dir, tuning.step, tuning.model, tuning.tokenizer, tuning.config,
                               state, metrics, heads=tuning.heads)
    checkpoint.prune_checkpoints(tuning.run_dir, tuning.config.train.keep_checkpoints)


# --------------------------------------------------------------- batches of token rows


def pad_token_id(tokenizer: Tokenizer) -> int:
    """The id that fills padded positions: <|pad|> where the tokenizer has it, else 0 (never attended to)."""
    return tokenizer.special_tokens.get(PAD, 0)


def pad_rows(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (ids (B, T), lengths (B,)), T the longest row."""
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)  # (B,)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)  # (B, T)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids.to(device), lengths.to(device)


def last_token_states(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, C): each row's hidden state at its last real (non-padding) position; hidden (B, T, C), lengths (B,)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, lengths - 1]


# --------------------------------------------------------------- task accuracy


def task_accuracy(model: Transformer, tokenizer: Tokenizer, examples: list[TaskExample],
                  max_new_tokens: int = 32) -> dict[str, float]:
    """Exact-match accuracy of greedy answers to the built-in tasks, per task and over all of them."""
    answers = generate_answers(model, tokenizer, [example.prompt for example in examples], max_new_tokens)
    right: dict[str, list[bool]] = {}
    for example, answer in zip(examples, answers):
        right.setdefault(example.task, []).append(check(example.task, answer, example.answer))
    figures = {f"accuracy_{task}": sum(marks) / len(marks) for task, marks in sorted(right.items())}
    figures["accuracy"] = sum(sum(marks) for marks in right.values()) / max(len(examples), 1)
    return figures


@torch.no_grad()
def generate_answers(model: Transformer, tokenizer: Tokenizer, questions: list[str], max_new_tokens: int,
                     temperature: float = 0.0, seed: int | None = None) -> list[str]:
    """The model's reply to each question as a one-turn chat, through the shared engine."""
    if not questions:
        return []
    rendered = [render_chat([{"role": "user", "content": question}], tokenizer) for question in questions]
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, stop=chat.stop,
                             stop_token_ids=chat.stop_token_ids, seed=None if seed is None else seed + i)
              for i, chat in enumerate(rendered)]
    engine = Engine(model, tokenizer, max_batch=min(32, len(questions)))
    completions = engine.generate([chat.prompt_ids for chat in rendered], params)
    return [completion.samples[0].text.strip() for completion in completions]
