"""The post-training objectives against numbers worked out by hand on tiny tensors.

Expected values are written as plain-float arithmetic (math.log / math.exp), never
by calling the torch expression under test, so a wrong formula cannot agree with itself.
"""

import math

import pytest
import torch

from binarylm.train.objectives import (
    bradley_terry_loss,
    dpo_loss,
    generalized_advantage_estimation,
    group_relative_advantages,
    grpo_loss,
    kl_penalty_rewards,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
    token_logprobs,
    whiten,
)


def neg_logsigmoid(x: float) -> float:
    """-log(sigmoid(x)) = log(1 + exp(-x))."""
    return math.log(1 + math.exp(-x))


def k3(ref_minus_new: float) -> float:
    return math.exp(ref_minus_new) - ref_minus_new - 1


# ----------------------------------------------------------------------------- log-probabilities


def brute_force_logprob(row: list[float], target: int) -> float:
    exps = [math.exp(x) for x in row]
    return math.log(exps[target] / sum(exps))


def test_token_and_sequence_logprobs_match_a_softmax_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    targets = torch.tensor([[1, 4, 0], [2, 3, -100]])  # -100: an ignore index in padding
    mask = torch.tensor([[True, True, True], [True, True, False]])

    valid = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    expected = {(b, t): brute_force_logprob(logits[b, t].tolist(), int(targets[b, t])) for b, t in valid}
    got = token_logprobs(logits, targets.clamp(min=0))
    assert got.shape == (2, 3)
    for b, t in valid:
        assert got[b, t].item() == pytest.approx(expected[b, t], abs=1e-6)

    sums = sequence_logprobs(logits, targets, mask)
    assert sums.shape == (2,)
    row0 = expected[0, 0] + expected[0, 1] + expected[0, 2]
    row1 = expected[1, 0] + expected[1, 1]
    assert sums.tolist() == pytest.approx([row0, row1], abs=1e-6)

    means = sequence_logprobs(logits, targets, mask, average=True)
    assert means.tolist() == pytest.approx([row0 / 3, row1 / 2], abs=1e-6)


def test_sequence_logprobs_ignores_whatever_sits_in_padding():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = float("inf")  # garbage at the padded position
    targets = torch.tensor([[3, -100]])
    mask = torch.tensor([[True, False]])
    assert sequence_logprobs(logits, targets, mask).item() == pytest.approx(math.log(1 / 4))


# ----------------------------------------------------------------------------- masked helpers


def test_masked_mean_ignores_nan_padding_exactly():
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 4) / 3)
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx([1.5, 4.0])


def test_whiten_uses_only_valid_entries():
    values = torch.tensor([[1.0, 2.0, 3.0], [6.0, 100.0, -100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    mean, variance = 3.0, ((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 4
    out = whiten(values, mask)
    std = math.sqrt(variance)
    expected = [(1 - mean) / std, (2 - mean) / std, (3 - mean) / std, (6 - mean) / std]
    assert [out[0, 0].item(), out[0, 1].item(), out[0, 2].item(), out[1, 0].item()] == pytest.approx(expected)
    assert out[1, 1].item() == 0 and out[1, 2].item() == 0
    kept_mean = whiten(values, mask, shift_mean=False)
    assert kept_mean[1, 0].item() == pytest.approx((6 - mean) / std + mean)


# ----------------------------------------------------------------------------- DPO and reward model


POLICY_CHOSEN, POLICY_REJECTED = [-1.0, -3.0], [-2.0, -1.0]
REFERENCE_CHOSEN, REFERENCE_REJECTED = [-1.5, -2.0], [-1.8, -1.5]


def dpo_inputs(**overrides):
    values = dict(
        policy_chosen=POLICY_CHOSEN, policy_rejected=POLICY_REJECTED,
        reference_chosen=REFERENCE_CHOSEN, reference_rejected=REFERENCE_REJECTED,
    )
    values.update(overrides)
    return {name: torch.tensor(v, dtype=torch.float64) for name, v in values.items()}


def test_dpo_loss_and_figures_by_hand():
    beta = 0.1
    # pair 1: chosen reward 0.1 * (-1 + 1.5) = 0.05, rejected 0.1 * (-2 + 1.8) = -0.02, margin 0.07
    # pair 2: chosen reward 0.1 * (-3 + 2) = -0.10, rejected 0.1 * (-1 + 1.5) = 0.05, margin -0.15
    loss, figures = dpo_loss(**dpo_inputs(), beta=beta)
    assert loss.item() == pytest.approx((neg_logsigmoid(0.07) + neg_logsigmoid(-0.15)) / 2)
    assert figures.chosen_reward == pytest.approx((0.05 - 0.10) / 2)
    assert figures.rejected_reward == pytest.approx((-0.02 + 0.05) / 2)
    assert figures.reward_margin == pytest.approx((0.07 - 0.15) / 2)
    assert figures.reward_accuracy == 0.5
    assert set(figures.as_dict("dpo/")) == {
        "dpo/chosen_reward", "dpo/rejected_reward", "dpo/reward_margin", "dpo/reward_accuracy",
    }


def test_dpo_label_smoothing_by_hand():
    eps = 0.2
    loss, _ = dpo_loss(**dpo_inputs(), beta=0.1, label_smoothing=eps)
    per_pair = [(1 - eps) * neg_logsigmoid(m) + eps * neg_logsigmoid(-m) for m in (0.07, -0.15)]
    assert loss.item() == pytest.approx(sum(per_pair) / 2)


def test_dpo_loss_falls_when_the_chosen_logprob_rises():
    inputs = dpo_inputs()
    policy_chosen = inputs.pop("policy_chosen").requires_grad_()
    loss, _ = dpo_loss(policy_chosen=policy_chosen, **inputs, beta=0.1)
    loss.backward()
    assert (policy_chosen.grad < 0).all()  # the gradient points to raising the chosen log-prob

    raised, _ = dpo_loss(policy_chosen=policy_chosen.detach() + 0.5, **inputs, beta=0.1)
    assert raised.item() < loss.item()


def test_bradley_terry_by_hand():
    chosen = torch.tensor([2.0, 0.5, -1.0])
    rejected = torch.tensor([1.0, 1.5, -1.0])  # differences 1, -1, 0
    loss, figures = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx((neg_logsigmoid(1.0) + neg_logsigmoid(-1.0) + math.log(2)) / 3)
    assert figures.accuracy == pytest.approx(1 / 3)  # a tie is not a win
    assert figures.margin == pytest.approx(0.0)


# ----------------------------------------------------------------------------- PPO pieces


def test_gae_by_hand_with_right_padding_and_a_left_prompt():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.0, 2.0, 99.0], [7.0, 0.5, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.2, -0.1, 50.0], [9.0, 0.6, 0.1]])
    mask = torch.tensor([[True, True, True], [True, True, False], [False, True, True]])
    advantages, returns = generalized_advantage_estimation(rewards, values, mask, gamma, lam)

    # row 0: three valid steps, the value after the last is 0
    d2 = 1.0 + gamma * 0 - 0.3
    d1 = -0.2 + gamma * 0.3 - 0.4
    d0 = 0.1 + gamma * 0.4 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    # row 1: right-padded; the 99 reward and 50 value in padding must not count
    e1 = 2.0 + gamma * 0 - (-0.1)
    e0 = 0.0 + gamma * (-0.1) - 0.2
    b1 = e1
    b0 = e0 + gamma * lam * b1
    # row 2: a prompt position first; it gets nothing and sends nothing
    f2 = 1.0 - 0.1
    f1 = 0.5 + gamma * 0.1 - 0.6
    c2 = f2
    c1 = f1 + gamma * lam * c2

    assert advantages.tolist()[0] == pytest.approx([a0, a1, a2])
    assert advantages.tolist()[1] == pytest.approx([b0, b1, 0.0])
    assert advantages.tolist()[2] == pytest.approx([0.0, c1, c2])
    assert returns.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3])
    assert returns.tolist()[1] == pytest.approx([b0 + 0.2, b1 - 0.1, 0.0])
    assert returns.tolist()[2] == pytest.approx([0.0, c1 + 0.6, c2 + 0.1])
    assert a0 == pytest.approx(0.08528)  # the recursion's arithmetic, checked once more


def ppo_batch():
    """Four valid tokens (ratios 1.5, 0.5, 1.1, 0.7) and two padded ones holding garbage."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -5.0, -5.0]])
    log_ratio = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)], [math.log(0.7), 10.0, 10.0]])
    advantages = torch.tensor([[1.0, 1.0, -2.0], [-1.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    return (old + log_ratio).requires_grad_(), old, advantages, mask


def test_ppo_policy_loss_clips_some_ratios_and_not_others():
    new, old, advantages, mask = ppo_batch()
    loss, figures = ppo_policy_loss(new, old, advantages, mask, clip=0.2)
    # ratio 1.5, A=+1: min(1.5, 1.2) = 1.2  (clipped)
    # ratio 0.5, A=+1: min(0.5, 0.8) = 0.5  (outside the range, but the unclipped term is smaller)
    # ratio 1.1, A=-2: min(-2.2, -2.2)      (inside the range)
    # ratio 0.7, A=-1: min(-0.7, -0.8) = -0.8 (clipped)
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.2 - 0.8) / 4, abs=1e-6)
    assert figures.clip_fraction == pytest.approx(3 / 4)
    ratios = [1.5, 0.5, 1.1, 0.7]
    assert figures.approx_kl == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 4, abs=1e-6)

    loss.backward()
    # d(-r*A)/d(log r) = -r*A where unclipped, 0 where the clipped term is chosen; padding gets 0
    expected_grad = [[0.0, -0.5 * 1.0 / 4, -1.1 * -2.0 / 4], [0.0, 0.0, 0.0]]
    assert new.grad.tolist()[0] == pytest.approx(expected_grad[0], abs=1e-6)
    assert new.grad.tolist()[1] == pytest.approx(expected_grad[1], abs=1e-6)


def test_ppo_value_loss_by_hand():
    old = torch.tensor([[1.0, 1.0, 0.0, 3.0]])
    new = torch.tensor([[1.5, 0.9, -0.5, -40.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.0, 1.0, 77.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, figures = ppo_value_loss(new, old, returns, mask, clip=0.2)
    # token 0: unclipped (1.5 - 2)^2 = 0.25, clipped (1.2 - 2)^2 = 0.64 -> 0.64
    # token 1: a step of -0.1 is inside the clip: (0.9 - 0)^2 = 0.81 both ways
    # token 2: unclipped (-0.5 - 1)^2 = 2.25, clipped (-0.2 - 1)^2 = 1.44 -> 2.25
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    assert figures.clip_fraction == pytest.approx(2 / 3)
    loss.backward()
    # token 0's clipped branch wins, so no gradient; others 0.5 * 2 * (v - R) / 3
    assert new.grad.tolist()[0] == pytest.approx([0.0, 0.9 / 3, -1.5 / 3, 0.0])


def test_kl_penalty_rewards_put_the_score_on_the_last_valid_token():
    scores = torch.tensor([2.0, -1.0])
    policy = torch.tensor([[-1.0, -2.0, -0.5], [9.0, -0.3, 7.0]])
    reference = torch.tensor([[-1.2, -1.5, -0.5], [0.0, -0.1, 0.0]])
    mask = torch.tensor([[True, True, True], [False, True, False]])
    rewards = kl_penalty_rewards(scores, policy, reference, mask, kl_coef=0.1)
    assert rewards.tolist()[0] == pytest.approx([-0.1 * 0.2, -0.1 * -0.5, -0.1 * 0.0 + 2.0])
    assert rewards.tolist()[1] == pytest.approx([0.0, -0.1 * -0.2 - 1.0, 0.0])


def test_kl_penalty_rewards_refuse_a_row_without_tokens():
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="no valid token"):
        kl_penalty_rewards(torch.zeros(2), torch.zeros(2, 2), torch.zeros(2, 2), mask, kl_coef=0.1)


# ----------------------------------------------------------------------------- GRPO


def test_group_relative_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    advantages = group_relative_advantages(rewards, group_size=4)
    mean = 0.25
    std = math.sqrt(((1 - mean) ** 2 + 3 * mean**2) / 4)
    expected_first = [(1 - mean) / (std + 1e-6)] + [(0 - mean) / (std + 1e-6)] * 3
    assert advantages.tolist()[:4] == pytest.approx(expected_first)
    assert advantages.tolist()[4:] == [0.0] * 4  # all samples equal: nothing to learn from the group


def test_group_relative_advantages_reject_a_ragged_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        group_relative_advantages(torch.zeros(6), group_size=4)


def grpo_batch():
    new = torch.tensor([[-1.0, -2.0], [-0.5, 3.0]])
    log_ratio = torch.tensor([[math.log(1.3), math.log(0.9)], [math.log(0.7), -8.0]])
    reference = torch.tensor([[-1.1, -1.5], [-0.5, 40.0]])
    advantages = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[True, True], [True, False]])
    return new.requires_grad_(), new - log_ratio, advantages, mask, reference


def test_grpo_loss_by_hand():
    new, old, advantages, mask, reference = grpo_batch()
    loss, figures = grpo_loss(new, old, advantages, mask, clip=0.2, kl_coef=0.1, reference_logprobs=reference)
    # row 0, A=+1: ratio 1.3 -> min(1.3, 1.2) = 1.2; ratio 0.9 -> 0.9. Row 1, A=-0.5: ratio 0.7 -> min(-0.35, -0.4)
    row0 = [-1.2 + 0.1 * k3(-1.1 - -1.0), -0.9 + 0.1 * k3(-1.5 - -2.0)]
    row1 = [0.4 + 0.1 * k3(0.0)]
    assert loss.item() == pytest.approx((sum(row0) / 2 + sum(row1) / 1) / 2, abs=1e-6)
    assert figures.clip_fraction == pytest.approx(2 / 3)
    assert figures.reference_kl == pytest.approx((k3(-0.1) + k3(0.5) + 0) / 3, abs=1e-6)

    token_loss, _ = grpo_loss(
        new, old, advantages, mask, clip=0.2, kl_coef=0.1, reference_logprobs=reference, token_level=True
    )
    assert token_loss.item() == pytest.approx((sum(row0) + sum(row1)) / 3, abs=1e-6)

    plain, plain_figures = grpo_loss(new, old, advantages, mask, clip=0.2)
    assert plain.item() == pytest.approx(((-1.2 - 0.9) / 2 + 0.4) / 2, abs=1e-6)
    assert plain_figures.reference_kl == 0.0


def test_grpo_loss_needs_a_reference_for_its_kl_term():
    new, old, advantages, mask, _ = grpo_batch()
    with pytest.raises(ValueError, match="reference_logprobs"):
        grpo_loss(new, old, advantages, mask, clip=0.2, kl_coef=0.1)
