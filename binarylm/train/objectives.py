"""The loss functions of post-training, as pure tensor maths.

Nothing here knows about models, tokenizers or data: every function takes
tensors that the training loops (`train/dpo.py`, `train/rlhf.py`, ...) have
already computed and returns a loss plus the figures worth logging. That keeps
each objective short enough to check by hand, which `tests/test_objectives.py`
does. The maths is explained in docs/alignment.md.

Shape conventions used throughout:

    B  batch (sequences, or preference pairs)
    T  sequence positions (already shifted: logits[:, t] predicts targets[:, t])
    V  vocabulary

Per-token quantities are (B, T) and come with a boolean `mask` (B, T) that is
True on the positions that count (the response tokens) and False on prompt
tokens and padding. Masked positions are ignored exactly: they are replaced,
not multiplied, so whatever sits in padding (an inf included) cannot change a
loss value. (Autograd still multiplies a NaN by the zero gradient of a replaced
entry, so padding that feeds a gradient should hold finite numbers.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------- masked reductions


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `values` where `mask` is True; padded entries contribute exactly 0 (even if NaN)."""
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` over the positions where `mask` is True.

    With `dim=None` the mean is over every valid entry of the tensor (a token-level mean);
    with a `dim` it is taken along that axis, and a row with no valid entry gives 0.
    """
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_variance(values: Tensor, mask: Tensor) -> Tensor:
    """Population variance (divide by n, not n - 1) of the valid entries, as a 0-dim tensor."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise the valid entries of `values` (B, T) to mean 0 and variance 1; padding becomes 0.

    PPO whitens advantages per batch so that the step size does not depend on the
    scale of the reward. `shift_mean=False` only rescales, keeping the sign of each entry
    (useful for rewards, whose mean carries meaning).
    """
    mean = masked_mean(values, mask)
    scaled = (values - mean) * torch.rsqrt(masked_variance(values, mask) + eps)
    if not shift_mean:
        scaled = scaled + mean
    return torch.where(mask, scaled, torch.zeros_like(scaled))


# --------------------------------------------------------------------------- log-probabilities


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(targets[b, t] | logits[b, t]) for every position, in float32.

    logits (B, T, V), targets (B, T) of valid token ids -> (B, T).
    Computed as the target's logit minus logsumexp over the vocabulary, which never
    builds a second (B, T, V) tensor of log-probabilities.
    """
    logits = logits.float()
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return target_logits - torch.logsumexp(logits, dim=-1)  # (B, T)


def sequence_logprobs(logits: Tensor, targets: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Total (or, with `average=True`, mean per token) log-probability of each row's masked targets.

    logits (B, T, V), targets (B, T), mask (B, T) bool -> (B,).
    Targets under a False mask may hold anything (an ignore index such as -100 included).
    """
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))  # (B, T)
    per_token = token_logprobs(logits, safe_targets)  # (B, T)
    if average:
        return masked_mean(per_token, mask, dim=1)
    return masked_sum(per_token, mask, dim=1)


# --------------------------------------------------------------------------- reported figures


@dataclass
class Figures:
    """Base for the small records of logged numbers each objective returns."""

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The fields as a flat dict, names optionally prefixed (e.g. "dpo/")."""
        return {prefix + name: value for name, value in asdict(self).items()}


@dataclass
class PreferenceFigures(Figures):
    """What a DPO step reports, averaged over the pairs of the batch.

    chosen_reward / rejected_reward: the implicit rewards beta * (log pi - log pi_ref).
    reward_margin: chosen minus rejected. reward_accuracy: fraction of pairs with
    a chosen reward strictly above the rejected one.
    """

    chosen_reward: float
    rejected_reward: float
    reward_margin: float
    reward_accuracy: float


@dataclass
class RewardModelFigures(Figures):
    """What a reward-model step reports: how often and by how much chosen outscores rejected."""

    accuracy: float
    margin: float


@dataclass
class PolicyFigures(Figures):
    """What a PPO or GRPO policy step reports.

    clip_fraction: fraction of valid tokens whose probability ratio fell outside
    [1 - clip, 1 + clip]. approx_kl: the estimate mean((r - 1) - log r) of KL(old || new).
    reference_kl: for GRPO, the mean estimated KL to the reference model (0 without one).
    """

    clip_fraction: float
    approx_kl: float
    reference_kl: float = 0.0


@dataclass
class ValueFigures(Figures):
    """What a PPO value step reports: the fraction of valid tokens whose value update was clipped."""

    clip_fraction: float


# --------------------------------------------------------------------------- preference objectives


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, PreferenceFigures]:
    """Direct Preference Optimisation loss over a batch of pairs.

    Each argument is (B,): the summed log-probability of the chosen or rejected
    response under the policy being trained or the frozen reference.

        h    = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
        loss = mean( -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h) )

    `label_smoothing` (eps) assumes a fraction eps of the labels are flipped
    ("conservative DPO"); eps = 0 is plain DPO. Returns (loss, figures).
    """
    chosen_reward = beta * (policy_chosen - reference_chosen)  # (B,)
    rejected_reward = beta * (policy_rejected - reference_rejected)  # (B,)
    logits = chosen_reward - rejected_reward  # (B,) = beta * h
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    with torch.no_grad():
        figures = PreferenceFigures(
            chosen_reward=chosen_reward.mean().item(),
            rejected_reward=rejected_reward.mean().item(),
            reward_margin=logits.mean().item(),
            reward_accuracy=(chosen_reward > rejected_reward).float().mean().item(),
        )
    return losses.mean(), figures


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> tuple[Tensor, RewardModelFigures]:
    """Reward-model loss: mean -log sigmoid(chosen - rejected) over pairs.

    chosen_scores, rejected_scores (B,): the scalar score of each response.
    Under the Bradley-Terry model P(chosen beats rejected) = sigmoid(score difference),
    so this is the negative log-likelihood of the human preferences. Returns (loss, figures).
    """
    difference = chosen_scores - rejected_scores  # (B,)
    loss = -F.logsigmoid(difference).mean()
    with torch.no_grad():
        figures = RewardModelFigures(
            accuracy=(difference > 0).float().mean().item(), margin=difference.mean().item()
        )
    return loss, figures


# --------------------------------------------------------------------------- PPO


def kl_penalty_rewards(
    scores: Tensor, policy_logprobs: Tensor, reference_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> Tensor:
    """Per-token rewards for PPO: a KL penalty on every response token, the score on the last.

    scores (B,): the reward model's (or checker's) score of each whole response.
    policy_logprobs, reference_logprobs, mask (B, T) -> rewards (B, T), 0 on padding.

        reward[b, t] = -kl_coef * (policy_logprobs[b, t] - reference_logprobs[b, t])
                       + scores[b] if t is the last valid position of row b

    The log-ratio is a one-sample estimate of the KL between policy and reference.
    The rewards are constants of the PPO step, so they carry no gradient.
    """
    if not bool(mask.any(dim=1).all()):
        raise ValueError("kl_penalty_rewards: a row of the mask has no valid token, so its score has nowhere to go")
    log_ratio = (policy_logprobs - reference_logprobs).detach()  # (B, T)
    rewards = -kl_coef * torch.where(mask, log_ratio, torch.zeros_like(log_ratio))  # (B, T)
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    last_valid = torch.where(mask, positions, -1).max(dim=1).values  # (B,)
    rows = torch.arange(mask.shape[0], device=mask.device)  # (B,)
    rewards[rows, last_valid] += scores.detach().to(rewards.dtype)
    return rewards


def generalized_advantage_estimation(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over (B, T) rewards and value estimates.

    Walking backwards over positions, with V(next) = 0 where the next position is not valid:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t      (the value head's regression target)

    A False mask position ends the episode: nothing flows back across it, so right
    padding (and a left prompt) are handled, and whatever sits in them is ignored.
    Returns (advantages, returns), both (B, T) and 0 on invalid positions, with no gradient.
    """
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards)).detach()
    values = torch.where(mask, values, torch.zeros_like(values)).detach()
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = torch.where(mask[:, t], delta + gamma * lam * next_advantage, 0.0)  # (B,)
        advantages[:, t] = advantage
        next_value, next_advantage = values[:, t], advantage  # both already 0 where invalid
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def _clipped_surrogate(
    new_logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token -min(r * A, clip(r) * A) with r = exp(new - old); also r and log r. All (B, T)."""
    log_ratio = new_logprobs - old_logprobs.detach()  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    advantages = advantages.detach()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    return -torch.minimum(unclipped, clipped), ratio, log_ratio


def _ratio_figures(ratio: Tensor, log_ratio: Tensor, mask: Tensor, clip: float) -> tuple[float, float]:
    """(clip fraction, approx KL(old || new)) over valid tokens."""
    with torch.no_grad():
        outside = ((ratio - 1).abs() > clip).float()
        approx_kl = (ratio - 1) - log_ratio
        return masked_mean(outside, mask).item(), masked_mean(approx_kl, mask).item()


def ppo_policy_loss(
    new_logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, PolicyFigures]:
    """PPO's clipped surrogate policy loss, a token-level masked mean.

    new_logprobs (B, T): log-probs of the rollout's tokens under the policy being updated
    (carries the gradient); old_logprobs (B, T): the same under the policy that sampled
    them; advantages (B, T); mask (B, T).

        r_t  = exp(new_t - old_t)
        loss = mean_t -min(r_t * A_t, clip(r_t, 1 - clip, 1 + clip) * A_t)

    old_logprobs and advantages are treated as constants. Returns (loss, figures).
    """
    per_token, ratio, log_ratio = _clipped_surrogate(new_logprobs, old_logprobs, advantages, clip)
    clip_fraction, approx_kl = _ratio_figures(ratio, log_ratio, mask, clip)
    return masked_mean(per_token, mask), PolicyFigures(clip_fraction=clip_fraction, approx_kl=approx_kl)


def ppo_value_loss(
    new_values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, ValueFigures]:
    """PPO's clipped value loss, a token-level masked mean.

    new_values (B, T) from the value head being trained, old_values (B, T) from the
    rollout, returns (B, T) from GAE, mask (B, T).

        V_clip = old + clip(new - old, -clip, +clip)
        loss   = mean_t 0.5 * max((new_t - R_t)^2, (V_clip_t - R_t)^2)

    Taking the max means a clipped step can only make the loss more pessimistic.
    Returns (loss, figures).
    """
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + (new_values - old_values).clamp(-clip, clip)  # (B, T)
    squared_errors = torch.maximum((new_values - returns) ** 2, (clipped_values - returns) ** 2)
    loss = 0.5 * masked_mean(squared_errors, mask)
    with torch.no_grad():
        clip_fraction = masked_mean(((new_values - old_values).abs() > clip).float(), mask).item()
    return loss, ValueFigures(clip_fraction=clip_fraction)


# --------------------------------------------------------------------------- GRPO


def group_relative_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO's advantages: each reward standardised within its group of samples of one prompt.

    rewards (B,) hold consecutive groups of `group_size` samples of the same prompt.
    Returns (B,) = (r - group mean) / (group std + eps), with the population std
    (divide by group_size), so a group whose samples all scored alike gets advantage 0.
    """
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"group_relative_advantages: {rewards.shape[0]} rewards do not split into groups of {group_size}; "
            "sample the same number of completions for every prompt"
        )
    groups = rewards.float().view(-1, group_size)  # (B / G, G)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)  # (B,)


def grpo_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip: float,
    kl_coef: float = 0.0,
    reference_logprobs: Tensor | None = None,
    token_level: bool = False,
) -> tuple[Tensor, PolicyFigures]:
    """GRPO's clipped policy loss with the sequence advantage on every token, plus an optional KL term.

    new_logprobs, old_logprobs, mask (B, T); advantages (B,) from `group_relative_advantages`;
    reference_logprobs (B, T) when kl_coef > 0.

        per_token = -min(r_t * A, clip(r_t) * A) + kl_coef * (exp(ref_t - new_t) - (ref_t - new_t) - 1)

    The KL term is the "k3" estimator: unbiased, and never negative. The loss averages
    per_token over each response, then over responses (as in the GRPO paper); with
    `token_level=True` it averages over all valid tokens instead, so long responses weigh more.
    Returns (loss, figures).
    """
    if kl_coef != 0 and reference_logprobs is None:
        raise ValueError("grpo_loss: kl_coef is set but no reference_logprobs were given")
    broadcast_advantages = advantages.unsqueeze(1).expand_as(new_logprobs)  # (B, T)
    per_token, ratio, log_ratio = _clipped_surrogate(new_logprobs, old_logprobs, broadcast_advantages, clip)
    reference_kl = torch.zeros_like(per_token)
    if reference_logprobs is not None:
        ref_minus_new = reference_logprobs.detach() - new_logprobs  # (B, T)
        reference_kl = torch.exp(ref_minus_new) - ref_minus_new - 1
        per_token = per_token + kl_coef * reference_kl
    loss = masked_mean(per_token, mask) if token_level else masked_mean(per_token, mask, dim=1).mean()
    clip_fraction, approx_kl = _ratio_figures(ratio, log_ratio, mask, clip)
    with torch.no_grad():
        mean_reference_kl = masked_mean(reference_kl, mask).item()
    return loss, PolicyFigures(clip_fraction=clip_fraction, approx_kl=approx_kl, reference_kl=mean_reference_kl)
