"""Pretraining: next-token prediction on the corpus, from step 0 or from a checkpoint.

One optimizer step = `grad_accum` micro-batches of `batch_size` windows on
each of `world_size` processes, so the global batch is their product. The
random generator is re-seeded from (seed, rank, step) at every step, and the
checkpoint holds the optimizer and the data position, so a resumed run takes
exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from binarylm import checkpoint
from binarylm.config import RunConfig
from binarylm.data.prepare import prepare_corpus
from binarylm.data.shards import TokenShards, WindowLoader
from binarylm.errors import BinaryLMError
from binarylm.eval.lm import bits_per_byte
from binarylm.model import Transformer
from binarylm.tokenizer import Tokenizer
from binarylm.train import distributed
from binarylm.train.monitor import Monitor
from binarylm.train.optim import build_optimizer, learning_rate

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything the loop works with, built once by `_build`."""

    config: RunConfig
    group: distributed.Distributed
    run_dir: Path
    tokenizer: Tokenizer
    loader: WindowLoader
    val_shards: TokenShards
    model: Transformer  # the plain module: what is saved
    trained: torch.nn.Module  # what is called: maybe compiled, maybe wrapped in DDP
    optimizer: torch.optim.Optimizer
    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # seconds of training before this process started (resumed runs)


def pretrain(config: RunConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train until train.max_steps (or the train.max_minutes budget); return the final metrics."""
    group = distributed.setup(config.train.device)
    try:
        run = _build(config, group, resume, progress)
        metrics = _loop(run, progress)
        if group.enabled:
            torch.distributed.barrier()  # rank 0 may still be writing the last checkpoint
        return metrics
    finally:
        distributed.teardown()


# ------------------------------------------------------------------- set-up


def _build(config: RunConfig, group: distributed.Distributed, resume: bool, progress: bool) -> Run:
    train = config.train
    if train.threads:
        torch.set_num_threads(train.threads)
    run_dir = Path(train.out_dir)
    if not resume and checkpoint.list_checkpoints(run_dir):
        raise BinaryLMError(
            f"{run_dir} already holds checkpoints; pass --resume to continue that run, "
            "or choose another --train.out_dir"
        )
    if resume and not checkpoint.list_checkpoints(run_dir):
        raise BinaryLMError(f"{run_dir} has no checkpoint to resume from; start the run without --resume")
    tokenizer, train_shards, val_shards = _data(config, run_dir, group, progress)
    config.model.vocab_size = tokenizer.vocab_size  # the embedding table matches the tokenizer
    torch.manual_seed(train.seed)  # the same initial weights in every process and every run
    model = Transformer(config.model).to(group.device)
    optimizer = build_optimizer(model, train)
    loader = WindowLoader(train_shards, config.model.context_length, train.batch_size,
                          stride=config.data.stride, seed=train.seed, rank=group.rank, world_size=group.world_size)
    run = Run(config, group, run_dir, tokenizer, loader, val_shards, model, model, optimizer)
    if resume:
        _restore(run)
    run.trained = _wrap(model, train.compile, group)
    return run


def _data(config: RunConfig, run_dir: Path, group: distributed.Distributed, progress: bool):
    """Rank 0 prepares the corpus; the other processes wait, then open what it wrote."""
    if group.is_main:
        prepared = prepare_corpus(config.data, run_dir / "data", progress=progress)
    if group.enabled:
        torch.distributed.barrier()
    if not group.is_main:
        prepared = prepare_corpus(config.data, run_dir / "data", progress=False)
    return prepared


def _restore(run: Run) -> None:
    found = checkpoint.resolve_checkpoint(run.run_dir)
    saved = checkpoint.load_checkpoint(found, device=run.group.device)
    if saved.config.model != run.config.model:
        raise BinaryLMError(
            f"the model settings differ from the checkpoint in {found}; resume with the same model.* settings"
        )
    run.model.load_state_dict(saved.model.state_dict())
    state = checkpoint.load_train_state(found)
    run.optimizer.load_state_dict(state["optimizer"])
    run.loader.load_state_dict(state["loader"])
    run.step, run.tokens_seen, run.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
    log.info("resumed from %s at step %d", found, run.step)


def _wrap(model: Transformer, compile_setting: str, group: distributed.Distributed) -> torch.nn.Module:
    trained: torch.nn.Module = model
    if compile_setting == "true" or (compile_setting == "auto" and group.device.type == "cuda"):
        trained = torch.compile(model)
    if group.enabled:
        device_ids = [group.device.index] if group.device.type == "cuda" else None
        trained = DistributedDataParallel(trained, device_ids=device_ids)
    return trained


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on CUDA by default; full precision elsewhere unless asked."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


# --------------------------------------------------------------------- loop


def _loop(run: Run, progress: bool) -> dict:
    train = run.config.train
    tokens_per_step = run.loader.tokens_per_batch * train.grad_accum
    monitor = Monitor(run.run_dir, train.max_steps, run.step, enabled=run.group.is_main, progress=progress)
    autocast = autocast_context(run.group.device, train.dtype)
    monitor.message(
        f"model {run.model.num_parameters() / 1e6:.2f}M parameters, {run.model.flops_per_token() / 1e6:.1f} "
        f"MFLOP/token (training); {tokens_per_step:,} tokens per step on {run.group.world_size} process(es), "
        f"{run.group.device}; steps {run.step} -> {train.max_steps}"
    )
    started = time.perf_counter()
    metrics: dict = {}
    window_started, window_steps = time.perf_counter(), 0
    try:
        while run.step < train.max_steps and not _out_of_time(run, started):
            loss, grad_norm = _train_step(run, autocast)
            run.step += 1
            run.tokens_seen += tokens_per_step
            window_steps += 1
            throughput = window_steps * tokens_per_step / max(time.perf_counter() - window_started, 1e-9)
            monitor.advance(1, loss, throughput)
            if run.step % train.log_every == 0 or run.step == 1:
                monitor.log(run.step, "train", {"loss": loss, "lr": learning_rate(run.step - 1, train),
                                                "grad_norm": grad_norm, "tokens_per_sec": throughput,
                                                "tokens": run.tokens_seen, **_expert_figures(run.model)})
                window_started, window_steps = time.perf_counter(), 0
            metrics["train_loss"] = loss
            if run.step % train.eval_every == 0:
                metrics.update(_validate(run, monitor, autocast))
            if run.step % train.save_every == 0:
                _save(run, started, metrics)
        if "val_loss" not in metrics or run.step % train.eval_every:
            metrics.update(_validate(run, monitor, autocast))
        metrics.update(step=run.step, tokens_seen=run.tokens_seen,
                       elapsed_seconds=run.elapsed + time.perf_counter() - started)
        _save(run, started, metrics)
    finally:
        monitor.close()
    return metrics


def _expert_figures(model: Transformer) -> dict:
    """For mixture-of-experts models: each layer's routing shares, and the busiest expert's load vs even."""
    usage = model.expert_usage()
    if not usage:
        return {}
    return {"expert_usage": [[round(share, 4) for share in layer] for layer in usage],
            "expert_max_load": max(max(layer) * len(layer) for layer in usage)}


def _out_of_time(run: Run, started: float) -> bool:
    budget = run.config.train.max_minutes * 60
    return budget > 0 and run.elapsed + time.perf_counter() - started >= budget


def _train_step(run: Run, autocast) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches; returns (mean loss, gradient norm)."""
    train = run.config.train
    torch.manual_seed(train.seed * 1_000_003 + run.group.rank * 7_919 + run.step)  # dropout, reproducibly
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.step, train)
    total = torch.zeros((), device=run.group.device)
    for micro in range(train.grad_accum):
        x, y = (t.to(run.group.device, non_blocking=True) for t in run.loader.next_batch())  # (B, T) each
        last = micro == train.grad_accum - 1
        sync = contextlib.nullcontext() if last or not run.group.enabled else run.trained.no_sync()
        with sync:
            with autocast():
                _, loss = run.trained(x, y)
            (loss / train.grad_accum).backward()
        total += loss.detach()
    max_norm = train.grad_clip if train.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss = distributed.mean_across_processes(total.item() / train.grad_accum, run.group, run.group.device)
    return loss, grad_norm.item()


def _validate(run: Run, monitor: Monitor, autocast) -> dict:
    """Validation loss, perplexity and bits per byte on the held-out shards."""
    train = run.config.train
    val_loader = WindowLoader(run.val_shards, run.config.model.context_length, train.batch_size,
                              rank=run.group.rank, world_size=run.group.world_size)
    with autocast():
        result = bits_per_byte(run.model, run.tokenizer, val_loader.eval_batches(train.batch_size, train.eval_batches),
                               run.group.device)
    mean = lambda value: distributed.mean_across_processes(value, run.group, run.group.device)  # noqa: E731
    nats = mean(result["loss"] * result["tokens"])
    tokens, n_bytes = mean(result["tokens"]), mean(result["bytes"])
    loss = nats / tokens
    figures = {"loss": loss, "perplexity": float(torch.tensor(loss).exp()),
               "bits_per_byte": nats / 0.6931471805599453 / n_bytes}
    monitor.log(run.step, "val", {**figures, "tokens": run.tokens_seen})
    monitor.message(f"step {run.step}: val loss {loss:.4f}, bits/byte {figures['bits_per_byte']:.4f}")
    return {f"val_{name}": value for name, value in figures.items()}


def _save(run: Run, started: float, metrics: dict) -> None:
    if not run.group.is_main:
        return
    state = {
        "step": run.step,
        "optimizer": run.optimizer.state_dict(),
        "loader": run.loader.state_dict(),
        "tokens_seen": run.tokens_seen,
        "elapsed": run.elapsed + time.perf_counter() - started,
    }
    checkpoint.save_checkpoint(run.run_dir, run.step, run.model, run.tokenizer, run.config, state, metrics)
    checkpoint.prune_checkpoints(run.run_dir, run.config.train.keep_checkpoints)
