"""Alignment stages (DPO, reward model, GRPO, PPO) on a tiny base: figures, checkpoints and exact resume."""

import json
import math

import pytest
import torch

from binarylm.checkpoint import load_checkpoint, load_heads
from binarylm.config import build_config
from binarylm.data.synthetic import make_examples
from binarylm.errors import BinaryLMError
from binarylm.model import Transformer
from binarylm.train import rlhf
from binarylm.train.dpo import Preference, dpo, read_preferences, tokenize_pairs
from binarylm.train.monitor import read_metrics
from binarylm.train.rlhf import checker_rewards, grpo, load_reward_model, ppo, reward


@pytest.fixture(scope="module")
def separable_preferences(tmp_path_factory):
    """A JSONL preference file any reward model can learn: "yes" is always chosen over "no"."""
    path = tmp_path_factory.mktemp("data") / "yes_no.jsonl"
    lines = [json.dumps({"prompt": f"Question {k}: agree?", "chosen": "yes", "rejected": "no"}) for k in range(60)]
    path.write_text("\n".join(lines) + "\n")
    return path


def stage_config(base, out_dir, steps: int = 4, batch_size: int = 2, warmup: int = 1, **finetune):
    """A short run. A run split in two halves repeats the whole run's learning rates (so its losses) only
    while the first half ends by step warmup + 1, where the cosine has not started in either."""
    values = {"finetune": {"base": str(base), "tasks": ["arithmetic", "reverse"], "train_examples": 16,
                           "test_examples": 2, "max_new_tokens": 4, **finetune},
              "train": {"out_dir": str(out_dir), "max_steps": steps, "batch_size": batch_size, "grad_accum": 1,
                        "eval_every": 100, "save_every": steps // 2, "log_every": 1, "warmup_steps": warmup,
                        "lr": 3e-3}}
    return build_config(values)


def records(run_dir, split: str) -> list[dict]:
    return [record for record in read_metrics(run_dir) if record["split"] == split]


def train_losses(run_dir) -> list[float]:
    return [record["loss"] for record in records(run_dir, "train")]


def assert_resumes_exactly(stage, make_config, tmp_path, steps: int = 4) -> dict:
    """Run `steps` at once and as two halves with --resume; the logged losses must agree exactly.

    The global seed is set before each fresh run because finetune.start draws new LoRA weights from it.
    """
    torch.manual_seed(0)
    whole = stage(make_config(tmp_path / "whole", steps), progress=False)
    torch.manual_seed(0)
    stage(make_config(tmp_path / "split", steps // 2), progress=False)
    resumed = stage(make_config(tmp_path / "split", steps), resume=True, progress=False)
    assert len(train_losses(tmp_path / "whole")) == steps
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "whole")
    assert resumed["train_loss"] == whole["train_loss"] and resumed["step"] == steps
    return whole


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_dpo_starts_at_log_2_logs_margins_and_resumes_exactly(base, tmp_path, lora_rank):
    whole = assert_resumes_exactly(dpo, lambda out, steps: stage_config(base, out, steps, lora_rank=lora_rank),
                                   tmp_path)
    first = records(tmp_path / "whole", "train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is still the reference
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert {"chosen_reward", "rejected_reward", "reward_accuracy"} <= set(first)
    assert whole["before_preference_margin"] == 0.0 and whole["before_preference_accuracy"] == 0.0
    assert "after_preference_accuracy" in whole and "after_accuracy_arithmetic" in whole
    assert same_weights(load_checkpoint(tmp_path / "whole").model, load_checkpoint(tmp_path / "split").model)


def test_reward_model_learns_a_separable_set_saves_its_head_and_resumes_exactly(
        base, tmp_path, separable_preferences):
    def make(out, steps):
        return stage_config(base, out, steps, batch_size=4, warmup=5, data=[str(separable_preferences)])

    whole = assert_resumes_exactly(reward, make, tmp_path, steps=12)
    assert whole["before_preference_accuracy"] == 0.0  # a fresh head scores every reply 0
    assert whole["after_preference_accuracy"] == 1.0
    assert records(tmp_path / "whole", "train")[0]["loss"] == pytest.approx(math.log(2))
    judge, again = load_reward_model(tmp_path / "whole"), load_reward_model(tmp_path / "split")
    assert same_weights(judge.head, again.head) and same_weights(judge.model, again.model)
    assert judge.head.weight.abs().sum() > 0
    assert load_checkpoint(tmp_path / "whole").model.config.d_model == 64  # still loads as a language model
    pair = tokenize_pairs([Preference("Do you agree?", "yes", "no")], judge.tokenizer, longest=64)[0]
    yes, no = judge.score([pair.chosen.ids, pair.rejected.ids])
    assert yes > no
    with pytest.raises(BinaryLMError, match="not a reward model"):
        load_reward_model(base)


def test_checker_rewards_grade_each_answer_of_each_group():
    first, second = make_examples("arithmetic", 2, "train", seed=0)
    answers = [first.answer, "nonsense", f" {second.answer} ", second.rejected]
    assert checker_rewards([first, second], answers, group=2).tolist() == [1.0, 0.0, 1.0, 0.0]


def test_grpo_rewards_come_from_the_checker_and_resume_is_exact(base, tmp_path, monkeypatch):
    graded = []

    def checker(task, prediction, answer):  # varied marks, so the groups have non-zero advantages
        graded.append((task, answer, len(prediction) % 2 == 0))
        return graded[-1][2]

    monkeypatch.setattr(rlhf, "check", checker)
    assert_resumes_exactly(grpo, lambda out, steps: stage_config(base, out, steps), tmp_path)
    first = records(tmp_path / "whole", "train")[0]
    samples = 2 * 4  # batch_size prompts x group_size (default 4) answers
    assert first["reward"] == pytest.approx(sum(mark for *_, mark in graded[:samples]) / samples)
    assert len(graded) == 2 * 4 * samples  # whole run (4 steps) + split run (2 + 2)
    tasks = {example.answer: example.task for name in ("arithmetic", "reverse")
             for example in make_examples(name, 16, "train", seed=1337)}
    assert all(tasks.get(answer) == task for task, answer, _ in graded)  # graded against the task's answer
    assert {"response_length", "reference_kl", "clip_fraction"} <= set(first)


def test_ppo_with_the_checker_or_a_reward_model_resumes_exactly(base, tmp_path, separable_preferences):
    assert_resumes_exactly(ppo, lambda out, steps: stage_config(base, out, steps), tmp_path / "checker")
    reward(stage_config(base, tmp_path / "judge", 4, batch_size=4, data=[str(separable_preferences)]),
           progress=False)

    def judged(out, steps):
        config = stage_config(base, out, steps)
        config.finetune.reward_model = str(tmp_path / "judge")
        return config

    assert_resumes_exactly(ppo, judged, tmp_path / "judged")
    first = records(tmp_path / "judged" / "whole", "train")[0]
    assert first["score"] != 0.0 and {"value_loss", "policy_loss", "reference_kl", "value_clip_fraction"} <= set(first)
    value_head = torch.nn.Linear(load_checkpoint(tmp_path / "judged" / "whole").model.config.d_model, 1)
    load_heads(tmp_path / "judged" / "whole", {"value": value_head})
    assert value_head.weight.abs().sum() > 0  # trained, and saved with the run
    assert isinstance(load_checkpoint(tmp_path / "judged" / "whole").model, Transformer)


def test_malformed_preference_files_are_reported_with_file_and_line(base, tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    broken = tmp_path / "broken.jsonl"
    broken.write_text(good + "\n{not json\n")
    with pytest.raises(BinaryLMError, match=r"broken\.jsonl, line 2: malformed JSON"):
        read_preferences(broken)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(good + "\n\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(BinaryLMError, match=r"missing\.jsonl, line 3: .*'rejected'"):
        read_preferences(missing)
    with pytest.raises(BinaryLMError, match=r"broken\.jsonl, line 2"):
        dpo(stage_config(base, tmp_path / "run", data=[str(broken)]), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(BinaryLMError, match="no preference pairs"):
        reward(stage_config(base, tmp_path / "run2", data=[str(empty)]), progress=False)
    with pytest.raises(BinaryLMError, match="does not read --finetune.data"):
        grpo(stage_config(base, tmp_path / "run3", data=[str(broken)]), progress=False)
