"""Reinforcement learning from feedback: a reward model, PPO with a value head, and GRPO.

reward   A reward model is the base transformer read through a scalar head: the final (normed)
         hidden state at a reply's last token, through nn.Linear(d_model, 1). It learns from
         preference pairs (the same data as DPO) with the Bradley-Terry loss
         -log sigmoid(score(chosen) - score(rejected)); held-out pairs give its accuracy.
grpo     Group-relative policy optimisation with the built-in tasks' exact checkers as the reward:
         each prompt is answered `group_size` times by sampling, an answer scores 1 if it checks and
         0 if not, and each answer's advantage is its score standardised within its group, so no
         value model is needed. An optional KL term keeps the policy near the reference.
ppo      PPO: one sampled answer per prompt, scored by a trained reward model (finetune.reward_model)
         or, without one, by the checker; a KL penalty to the reference on every token, a value head
         on the policy's hidden states, generalised advantage estimation, and the clipped policy and
         value losses.

Rollouts are sampled by the shared inference engine (infer/engine.py), with a seed per prompt
derived from (train.seed, step, prompt), so a resumed run samples what the uninterrupted run did.
Each rollout batch gets one optimizer step: the log-probabilities the update starts from ("old")
are those of the policy that sampled, so the probability ratio starts at 1. The reference is the
model the stage starts from: the frozen base under the adapters with LoRA (`lora_disabled`), or a
frozen copy of it for full fine-tuning.

Heads. The reward and value heads are small modules beside the transformer (finetune.Tuning.heads),
so a reward or PPO checkpoint still loads as a plain language model anywhere: they train in their
own optimizer group, count in train.grad_clip's norm, and are saved in each checkpoint's
heads.safetensors, which finetune.restore and `load_reward_model` read back.

The settings (group_size, kl_coef, clip_ratio, value_clip, value_coef, gae_gamma, gae_lambda,
rollout_temperature, reward_model) are FinetuneConfig fields.
"""

from __future__ import annotations

import copy
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from binarylm import checkpoint
from binarylm.config import FinetuneConfig, RunConfig
from binarylm.data.chat import render_chat
from binarylm.data.synthetic import TaskExample, check
from binarylm.errors import BinaryLMError
from binarylm.infer.engine import Engine
from binarylm.infer.sampling import SamplingParams
from binarylm.model import Transformer
from binarylm.model.lora import lora_disabled
from binarylm.tokenizer import ENDOFTEXT, IM_END, IM_START, Tokenizer
from binarylm.train import finetune
from binarylm.train.dpo import TokenizedPair, longest_sequence, preference_splits, tokenize_pairs
from binarylm.train.objectives import (
    bradley_terry_loss,
    generalized_advantage_estimation,
    group_relative_advantages,
    grpo_loss,
    kl_penalty_rewards,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
    whiten,
)
from binarylm.train.sft import test_tasks, train_tasks

REWARD_HEAD = "reward"
VALUE_HEAD = "value"
MAX_ROLLOUT_SLOTS = 256  # engine slots (sequences decoded together) per rollout


# --------------------------------------------------------------------------------------------- hidden states


def scalar_head(d_model: int) -> nn.Linear:
    """nn.Linear(d_model, 1) starting at zero: every sequence scores 0 until it learns otherwise."""
    head = nn.Linear(d_model, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def last_token_scores(model: Transformer, head: nn.Module, ids: torch.Tensor, lengths: torch.Tensor
                      ) -> torch.Tensor:
    """(B,): the head's score of each row's hidden state at its last real token. ids (B, T) right-padded."""
    return head(finetune.last_token_states(model.hidden_states(ids), lengths)).squeeze(-1)  # (B,)


def order_with_heads(tuning: finetune.Tuning, count: int, heads: dict[str, nn.Module]) -> finetune.ExampleOrder:
    """The example order of a stage that trains `heads` beside the model (saved in each checkpoint)."""
    tuning.add_heads(heads)
    return finetune.ExampleOrder(count, tuning.config.train.batch_size, tuning.config.train.seed)


# --------------------------------------------------------------------------------------------- the reward model


@dataclass
class RewardModel:
    """A trained reward model: the transformer, its scalar head, and the tokenizer they read."""

    model: Transformer
    head: nn.Linear
    tokenizer: Tokenizer

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> torch.Tensor:
        """(N,) scores of whole chats (prompt, reply and its end-of-turn token), higher is better."""
        ids, lengths = finetune.pad_rows(sequences, finetune.pad_token_id(self.tokenizer), self.model.device)
        return last_token_scores(self.model, self.head, ids, lengths)


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    """A reward model from a checkpoint (or run directory) of `binarylm finetune reward`."""
    found = checkpoint.resolve_checkpoint(path)
    saved = checkpoint.load_checkpoint(found, device=device)
    head = scalar_head(saved.model.config.d_model)
    try:
        checkpoint.load_heads(found, {REWARD_HEAD: head})
    except BinaryLMError:
        raise BinaryLMError(f"{found} is not a reward model (it has no reward head); "
                            "train one with `binarylm finetune reward`") from None
    return RewardModel(saved.model.requires_grad_(False), head.to(device).requires_grad_(False), saved.tokenizer)


def reward(config: RunConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train a reward model (finetune.base plus a scalar head) on preference pairs; return the final figures."""
    tuning = finetune.start("reward", config, resume)
    pad_id = finetune.pad_token_id(tuning.tokenizer)
    train_pairs, test_pairs = (tokenize_pairs(pairs, tuning.tokenizer, longest_sequence(config))
                               for pairs in preference_splits(config))
    head = scalar_head(config.model.d_model)
    order = order_with_heads(tuning, len(train_pairs), {REWARD_HEAD: head})
    if resume:
        finetune.restore(tuning, order)

    def loss(indices: list[int]):
        chosen, rejected = pair_scores(tuning.model, head, [train_pairs[i] for i in indices], pad_id)
        value, figures = bradley_terry_loss(chosen, rejected)
        return value, figures.as_dict()

    def evaluate() -> dict:
        if not test_pairs:
            return {}
        with torch.no_grad():
            scored = [pair_scores(tuning.model, head, test_pairs[start: start + config.train.batch_size], pad_id)
                      for start in range(0, len(test_pairs), config.train.batch_size)]
        margin = torch.cat([chosen - rejected for chosen, rejected in scored])  # (M,)
        return {"preference_accuracy": (margin > 0).float().mean().item(), "preference_margin": margin.mean().item()}

    return finetune.train(tuning, order, loss, evaluate, progress)


def pair_scores(model: Transformer, head: nn.Module, pairs: list[TokenizedPair], pad_id: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) scores of each pair's replies, in one forward."""
    sequences = [pair.chosen.ids for pair in pairs] + [pair.rejected.ids for pair in pairs]
    ids, lengths = finetune.pad_rows(sequences, pad_id, model.device)  # (2B, T), (2B,)
    scores = last_token_scores(model, head, ids, lengths)  # (2B,)
    return scores[: len(pairs)], scores[len(pairs):]


# --------------------------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """Sampled answers to a batch of prompts (consecutive groups per prompt), laid out for a training forward."""

    inputs: torch.Tensor  # (N, T) prompt and answer tokens without the last, right-padded
    targets: torch.Tensor  # (N, T) the token after each position (padding where there is none)
    mask: torch.Tensor  # (N, T) True where the target is an answer token (its end-of-turn token included)
    sequences: list[list[int]]  # prompt + answer ids of each sample, what a reward model scores
    answers: list[str]  # each sample's answer text, without the end-of-turn token


def end_of_turn_id(tokenizer: Tokenizer) -> int | None:
    """The token that ends an assistant reply: <|im_end|> with chat tokens, else <|endoftext|> (if any)."""
    specials = tokenizer.special_tokens
    if IM_START in specials and IM_END in specials:
        return specials[IM_END]
    return specials.get(ENDOFTEXT, tokenizer.eot_id)


@contextmanager
def keeps_mode(model: nn.Module):
    """Whatever a block does to train/eval mode (the engine switches to eval), the model leaves in its old mode."""
    training = model.training
    try:
        yield model
    finally:
        model.train(training)


def rollout(model: Transformer, tokenizer: Tokenizer, prompts: list[str], seeds: list[int], group: int,
            max_new_tokens: int, temperature: float) -> Rollout:
    """Sample `group` answers to each one-turn chat prompt with the engine, the request for prompt i seeded seeds[i].

    The engine stops only at the end-of-turn token, so an answer that stopped ends with it (the
    policy chose to end there) and one that hit max_new_tokens does not.
    """
    if max_new_tokens < 1:
        raise BinaryLMError("rollouts need finetune.max_new_tokens of at least 1")
    prompt_ids = [render_chat([{"role": "user", "content": prompt}], tokenizer).prompt_ids for prompt in prompts]
    end = end_of_turn_id(tokenizer)
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, n=group, seed=seed,
                             stop_token_ids=[] if end is None else [end]) for seed in seeds]
    longest = max(len(ids) for ids in prompt_ids) + max_new_tokens
    slots = max(group, min(len(prompts) * group, MAX_ROLLOUT_SLOTS))
    with keeps_mode(model):
        engine = Engine(model, None, max_batch=slots, max_length=longest)  # no tokenizer: stop at `end` only
        completions = engine.generate(prompt_ids, params)
    sequences, prompt_lengths, answers = [], [], []
    for ids, completion in zip(prompt_ids, completions):
        for sample in completion.samples:
            stopped = sample.finish_reason == "stop" and end is not None
            sequences.append(ids + sample.token_ids + ([end] if stopped else []))
            prompt_lengths.append(len(ids))
            answers.append(tokenizer.decode(sample.token_ids).strip())
    return _lay_out(sequences, prompt_lengths, answers, finetune.pad_token_id(tokenizer), model.device)


def _lay_out(sequences: list[list[int]], prompt_lengths: list[int], answers: list[str], pad_id: int,
             device: torch.device) -> Rollout:
    """Shift the sampled chats into inputs and targets (N, T), masked True on the answers' tokens."""
    width = max(len(sequence) for sequence in sequences) - 1
    inputs = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (N, T)
    targets = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)  # (N, T)
    for row, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        inputs[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
        targets[row, : len(sequence) - 1] = torch.tensor(sequence[1:])
        mask[row, prompt_length - 1: len(sequence) - 1] = True  # targets[t] = sequence[t + 1]
    return Rollout(inputs.to(device), targets.to(device), mask.to(device), sequences, answers)


def rollout_seed(seed: int, step: int, prompt_index: int) -> int:
    """The sampling seed of one prompt's request at one step: the same on every run and after --resume."""
    return random.Random(f"rollout:{seed}:{step}:{prompt_index}").getrandbits(62)


def checker_rewards(examples: list[TaskExample], answers: list[str], group: int = 1) -> torch.Tensor:
    """(N,): 1.0 where answer i checks against its example's answer, else 0.0; `group` answers per example."""
    graded = [check(example.task, answer, example.answer)
              for example, start in zip(examples, range(0, len(answers), group))
              for answer in answers[start: start + group]]
    return torch.tensor(graded, dtype=torch.float32)


class Reference:
    """The frozen model a stage started from: the base under the adapters (LoRA), or a copy of the base."""

    def __init__(self, model: Transformer, lora: bool):
        self.lora = lora
        self.model = model if lora else copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def token_logprobs(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(N, T): log ref(targets[n, t] | inputs[n, :t + 1]), in eval mode."""
        with keeps_mode(self.model), (lora_disabled(self.model) if self.lora else nullcontext()):
            logits, _ = self.model.eval()(inputs)  # (N, T, V)
        return token_logprobs(logits, targets)


def rollout_prompts(config: RunConfig, stage: str) -> list[TaskExample]:
    """The built-in tasks' training prompts, which the checkers can grade."""
    if config.finetune.data:
        raise BinaryLMError(f"{stage} samples answers to the built-in tasks (--finetune.tasks) and does not read "
                            "--finetune.data; drop it")
    examples = train_tasks(config)
    if not examples:
        raise BinaryLMError(f"{stage} has no prompts: give built-in --finetune.tasks with --finetune.train_examples "
                            "above 0")
    return examples


def task_evaluation(tuning: finetune.Tuning, held_out: list[TaskExample]):
    """The evaluate() of a policy stage: task accuracy by greedy generation on the held-out tasks."""
    def evaluate() -> dict:
        if not held_out:
            return {}
        return finetune.task_accuracy(tuning.model, tuning.tokenizer, held_out, tuning.config.finetune.max_new_tokens)
    return evaluate


def sample_prompts(tuning: finetune.Tuning, prompts: list[TaskExample], indices: list[int], group: int,
                   settings: FinetuneConfig) -> tuple[list[TaskExample], Rollout]:
    """The examples at `indices` and a rollout of `group` answers to each, seeded by (train.seed, step, index)."""
    examples = [prompts[i] for i in indices]
    seeds = [rollout_seed(tuning.config.train.seed, tuning.step, i) for i in indices]
    batch = rollout(tuning.model, tuning.tokenizer, [example.prompt for example in examples], seeds, group,
                    tuning.config.finetune.max_new_tokens, settings.rollout_temperature)
    return examples, batch


def reference_for(tuning: finetune.Tuning, settings: FinetuneConfig) -> Reference | None:
    """The starting policy as a frozen reference, or None without a KL term. Call it before finetune.restore."""
    return Reference(tuning.model, tuning.config.finetune.lora_rank > 0) if settings.kl_coef else None


def _mean_length(batch: Rollout) -> float:
    return batch.mask.sum(dim=1).float().mean().item()


# --------------------------------------------------------------------------------------------- GRPO


def grpo(config: RunConfig, resume: bool = False, progress: bool = True) -> dict:
    """Group-relative policy optimisation on the built-in tasks, rewarded by their checkers; the final figures."""
    tuning = finetune.start("grpo", config, resume)
    prompts = rollout_prompts(config, "grpo")
    settings = config.finetune
    group = settings.group_size
    if group < 2:
        raise BinaryLMError(f"grpo compares answers within a group: finetune.group_size must be 2 or more, got {group}")
    reference = reference_for(tuning, settings)
    order = finetune.ExampleOrder(len(prompts), config.train.batch_size, config.train.seed)
    if resume:
        finetune.restore(tuning, order)

    def loss(indices: list[int]):
        examples, batch = sample_prompts(tuning, prompts, indices, group, settings)
        rewards = checker_rewards(examples, batch.answers, group).to(tuning.device)  # (N,)
        logits, _ = tuning.model(batch.inputs)  # (N, T, V)
        policy = token_logprobs(logits, batch.targets)  # (N, T)
        anchor = reference.token_logprobs(batch.inputs, batch.targets) if reference is not None else None
        value, figures = grpo_loss(policy, policy.detach(), group_relative_advantages(rewards, group), batch.mask,
                                   settings.clip_ratio, settings.kl_coef, anchor)
        return value, {"reward": rewards.mean().item(), "response_length": _mean_length(batch), **figures.as_dict()}

    return finetune.train(tuning, order, loss, task_evaluation(tuning, test_tasks(config)), progress)


# --------------------------------------------------------------------------------------------- PPO


def ppo(config: RunConfig, resume: bool = False, progress: bool = True) -> dict:
    """PPO on the built-in tasks, scored by finetune.reward_model (or the checkers); return the final figures."""
    tuning = finetune.start("ppo", config, resume)
    prompts = rollout_prompts(config, "ppo")
    scorer = _ppo_scorer(config, tuning)
    settings = config.finetune
    reference = reference_for(tuning, settings)
    value_head = scalar_head(config.model.d_model)
    order = order_with_heads(tuning, len(prompts), {VALUE_HEAD: value_head})
    if resume:
        finetune.restore(tuning, order)

    def loss(indices: list[int]):
        examples, batch = sample_prompts(tuning, prompts, indices, 1, settings)
        scores = scorer(examples, batch)  # (N,)
        hidden = tuning.model.hidden_states(batch.inputs)  # (N, T, C)
        logits = tuning.model.lm_head(hidden)  # (N, T, V)
        policy = token_logprobs(logits, batch.targets)  # (N, T)
        values = value_head(hidden).squeeze(-1)  # (N, T)
        anchor = reference.token_logprobs(batch.inputs, batch.targets) if reference is not None else None
        value, figures = ppo_objective(policy, values, anchor, scores, batch.mask, settings)
        return value, {**figures, "response_length": _mean_length(batch)}

    return finetune.train(tuning, order, loss, task_evaluation(tuning, test_tasks(config)), progress)


def ppo_objective(policy: torch.Tensor, values: torch.Tensor, reference: torch.Tensor | None, scores: torch.Tensor,
                  mask: torch.Tensor, settings: FinetuneConfig) -> tuple[torch.Tensor, dict]:
    """PPO's loss for one update on a fresh rollout, and its figures.

    policy (N, T): log-probabilities of the sampled tokens under the policy (with gradient); values (N, T):
    the value head's estimates (with gradient); reference (N, T) or None (no KL term); scores (N,): each
    answer's score; mask (N, T): the answer tokens. The rollout's "old" log-probabilities and values are
    these same numbers, detached, so the probability ratio starts at 1.
    """
    old_policy, old_values = policy.detach(), values.detach()
    reference = old_policy if reference is None else reference
    rewards = kl_penalty_rewards(scores, old_policy, reference, mask, settings.kl_coef)  # (N, T)
    advantages, returns = generalized_advantage_estimation(rewards, old_values, mask, settings.gae_gamma,
                                                           settings.gae_lambda)  # (N, T) each
    policy_loss, policy_figures = ppo_policy_loss(policy, old_policy, whiten(advantages, mask), mask,
                                                  settings.clip_ratio)
    value_loss, value_figures = ppo_value_loss(values, old_values, returns, mask, settings.value_clip)
    figures = {**policy_figures.as_dict(), **value_figures.as_dict("value_"), "score": scores.mean().item(),
               "reference_kl": masked_mean(old_policy - reference, mask).item(),
               "policy_loss": policy_loss.item(), "value_loss": value_loss.item()}
    return policy_loss + settings.value_coef * value_loss, figures


def _ppo_scorer(config: RunConfig, tuning: finetune.Tuning):
    """score(examples, rollout) -> (N,): the reward model named by finetune.reward_model, else the checkers."""
    path = config.finetune.reward_model
    if not path:
        return lambda examples, batch: checker_rewards(examples, batch.answers).to(tuning.device)
    judge = load_reward_model(path, tuning.device)
    if judge.tokenizer.vocab_size != tuning.tokenizer.vocab_size:
        raise BinaryLMError(f"the reward model {path} reads another tokenizer ({judge.tokenizer.vocab_size} ids, "
                            f"the policy has {tuning.tokenizer.vocab_size}); train it from the same base")
    return lambda examples, batch: judge.score(batch.sequences)
