"""Direct Preference Optimisation (DPO): learn from pairs of a better and a worse answer, without a reward model.

Each example is a prompt with a `chosen` and a `rejected` reply. The policy (the model being
trained) and a frozen reference (the model it started as) each give the summed log-probability
of both replies; DPO raises the chosen reply's log-ratio to the reference above the rejected one's:

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

(objectives.dpo_loss). At step 0 the policy is the reference, so the loss is exactly log 2.
The reference never changes, so its log-probabilities are computed once, in batches, when the
stage starts, from the base the run starts from (on `--resume` they are computed again from
that same base, before the trained weights are restored, and come out the same).

Pairs come from preference files (`finetune.data`: JSONL, one {"prompt", "chosen", "rejected"}
object per line; a hash of the prompt holds out a fifth of them, as the built-in tasks do) or
from the built-in tasks, whose preference variant pairs the right answer with a plausible wrong
one. A reply is scored on exactly the tokens SFT would train on: its text and the end-of-turn
token after it. Evaluation reports task accuracy by generation on the held-out tasks and the
preference accuracy on held-out pairs: the share whose chosen reply gained more log-probability
over the reference than the rejected one.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from binarylm.config import RunConfig
from binarylm.data.chat import IGNORE_INDEX, TrainingTokens, pad_examples, render_for_training, to_example
from binarylm.data.records import json_records
from binarylm.data.synthetic import split_of, to_preference
from binarylm.errors import BinaryLMError
from binarylm.model import Transformer
from binarylm.tokenizer import Tokenizer
from binarylm.train import finetune
from binarylm.train.objectives import dpo_loss, sequence_logprobs
from binarylm.train.sft import test_tasks, train_tasks

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


class Preference(NamedTuple):
    """One comparison: a user prompt, the better reply and the worse one."""

    prompt: str
    chosen: str
    rejected: str


class TokenizedPair(NamedTuple):
    """A preference as two rendered chats, each masked True on the reply and its end-of-turn token."""

    chosen: TrainingTokens
    rejected: TrainingTokens


def dpo(config: RunConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train finetune.base with DPO on preference pairs until train.max_steps; return the final figures."""
    tuning = finetune.start("dpo", config, resume)
    pad_id = finetune.pad_token_id(tuning.tokenizer)
    train_pairs, test_pairs = (tokenize_pairs(pairs, tuning.tokenizer, longest_sequence(config))
                               for pairs in preference_splits(config))
    batch_size, beta = config.train.batch_size, config.finetune.beta
    # The reference is the starting policy: scored now, before a resumed run restores its trained weights.
    reference = score_pairs(tuning.model, train_pairs, pad_id, batch_size)  # (N, 2): chosen, rejected
    test_reference = score_pairs(tuning.model, test_pairs, pad_id, batch_size)  # (M, 2)
    order = finetune.ExampleOrder(len(train_pairs), batch_size, config.train.seed)
    if resume:
        finetune.restore(tuning, order)
    held_out = test_tasks(config)

    def loss(indices: list[int]):
        policy = pair_logprobs(tuning.model, [train_pairs[i] for i in indices], pad_id)  # (B, 2)
        anchor = reference[indices]  # (B, 2)
        value, figures = dpo_loss(policy[:, 0], policy[:, 1], anchor[:, 0], anchor[:, 1], beta)
        return value, figures.as_dict()

    def evaluate() -> dict:
        figures = {}
        if held_out:
            figures.update(finetune.task_accuracy(tuning.model, tuning.tokenizer, held_out,
                                                  config.finetune.max_new_tokens))
        if test_pairs:
            policy = score_pairs(tuning.model, test_pairs, pad_id, batch_size)  # (M, 2)
            figures.update(preference_figures(policy, test_reference, beta))
        return figures

    return finetune.train(tuning, order, loss, evaluate, progress)


# --------------------------------------------------------------------------------------------- preference data


def preference_splits(config: RunConfig) -> tuple[list[Preference], list[Preference]]:
    """(train, held-out) pairs: from finetune.data files split by a hash of the prompt, or the built-in tasks."""
    tune = config.finetune
    if tune.data:
        pairs = [pair for path in tune.data for pair in read_preferences(path)]
        train = [pair for pair in pairs if split_of(pair.prompt) == "train"]
        test = [pair for pair in pairs if split_of(pair.prompt) == "test"]
    else:
        train = [Preference(**to_preference(example)) for example in train_tasks(config)]
        test = [Preference(**to_preference(example)) for example in test_tasks(config)]
    if not train:
        raise BinaryLMError("there are no preference pairs to train on: give --finetune.data FILE.jsonl of "
                            '{"prompt", "chosen", "rejected"} lines, or built-in --finetune.tasks with '
                            "--finetune.train_examples above 0")
    return train, test


def read_preferences(path: str | Path) -> list[Preference]:
    """The {"prompt", "chosen", "rejected"} objects of a JSONL file; a bad line is an error naming file and line."""
    return [_preference(record, where) for where, record in json_records(path, '{"prompt", "chosen", "rejected"}')]


def _preference(record: object, where: str) -> Preference:
    if not isinstance(record, dict) or not all(isinstance(record.get(name), str) for name in PREFERENCE_FIELDS):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise BinaryLMError(f"{where}: a preference record needs the text fields 'prompt', 'chosen' and "
                            f"'rejected'; got {found}")
    if record["chosen"] == record["rejected"]:
        raise BinaryLMError(f"{where}: 'chosen' and 'rejected' are the same text, so there is nothing to prefer")
    return Preference(record["prompt"], record["chosen"], record["rejected"])


def longest_sequence(config: RunConfig) -> int:
    """The most tokens of one rendered chat (prompt and reply): finetune.max_length, at most the context."""
    context = config.model.context_length
    return min(config.finetune.max_length or context, context)


def tokenize_pairs(pairs: list[Preference], tokenizer: Tokenizer, longest: int) -> list[TokenizedPair]:
    """Each pair as two one-turn chats rendered for training, cut after the reply's end-of-turn token."""
    return [TokenizedPair(*(_reply_tokens(pair.prompt, reply, tokenizer, longest, number)
                            for reply in (pair.chosen, pair.rejected)))
            for number, pair in enumerate(pairs)]


def _reply_tokens(prompt: str, reply: str, tokenizer: Tokenizer, longest: int, number: int) -> TrainingTokens:
    """The chat's ids through the reply's last trained token (the "\\n" after it is dropped), at most `longest`."""
    chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    ids, mask = render_for_training(chat, tokenizer, train_on="last")
    end = max(i for i, trained in enumerate(mask) if trained) + 1
    ids, mask = ids[: min(end, longest)], mask[: min(end, longest)]
    if not any(mask[1:]):
        raise BinaryLMError(f"preference pair {number} ({prompt[:40]!r}...): the prompt fills all {longest} tokens "
                            "allowed, leaving no room for the reply; shorten it or raise --finetune.max_length")
    return TrainingTokens(ids, mask)


# --------------------------------------------------------------------------------------------- log-probabilities


def response_logprobs(model: Transformer, sequences: list[TrainingTokens], pad_id: int) -> torch.Tensor:
    """(N,): each sequence's summed log-probability of its masked (reply) tokens under `model`."""
    inputs, targets = pad_examples([to_example(tokens.ids, tokens.mask) for tokens in sequences], pad_id)  # (N, T)
    inputs, targets = inputs.to(model.device), targets.to(model.device)
    logits, _ = model(inputs)  # (N, T, V)
    return sequence_logprobs(logits, targets, targets != IGNORE_INDEX)  # (N,)


def pair_logprobs(model: Transformer, pairs: list[TokenizedPair], pad_id: int) -> torch.Tensor:
    """(B, 2): the log-probability of each pair's chosen (column 0) and rejected (column 1) reply, one forward."""
    sequences = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    both = response_logprobs(model, sequences, pad_id)  # (2B,)
    return torch.stack((both[: len(pairs)], both[len(pairs):]), dim=1)  # (B, 2)


@torch.no_grad()
def score_pairs(model: Transformer, pairs: list[TokenizedPair], pad_id: int, batch_size: int) -> torch.Tensor:
    """(N, 2) log-probabilities of every pair's replies, `batch_size` pairs at a time, in eval mode, no gradient."""
    training = model.training
    model.eval()
    try:
        rows = [pair_logprobs(model, pairs[start: start + batch_size], pad_id)
                for start in range(0, len(pairs), batch_size)]
    finally:
        model.train(training)
    return torch.cat(rows) if rows else torch.zeros(0, 2, device=model.device)


def preference_figures(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, float]:
    """Held-out preference accuracy (chosen gained more over the reference than rejected) and the mean margin.

    policy, reference (M, 2): log-probabilities of (chosen, rejected) under the policy and the reference.
    """
    gained = policy - reference  # (M, 2)
    margin = gained[:, 0] - gained[:, 1]  # (M,)
    return {"preference_accuracy": (margin > 0).float().mean().item(),
            "preference_margin": (beta * margin).mean().item()}
