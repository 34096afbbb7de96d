"""Post-training stages: SFT (full, LoRA, QLoRA) from a base checkpoint, its checkpoints and exact resume."""

import pytest
import torch

from binarylm.checkpoint import load_checkpoint
from binarylm.cli import main
from binarylm.config import build_config
from binarylm.errors import BinaryLMError
from binarylm.model.lora import lora_layers
from binarylm.train.finetune import ExampleOrder
from binarylm.train.monitor import read_metrics
from binarylm.train.sft import sft


def sft_config(base, out_dir, steps: int = 6, **finetune):
    values = {"finetune": {"base": str(base), "tasks": ["arithmetic", "reverse"], "train_examples": 40,
                           "test_examples": 4, "max_new_tokens": 6, **finetune},
              "train": {"out_dir": str(out_dir), "max_steps": steps, "batch_size": 4, "grad_accum": 2,
                        "eval_every": 100, "save_every": 3, "log_every": 1, "warmup_steps": 2, "lr": 3e-3}}
    return build_config(values)


def train_losses(run_dir) -> list[float]:
    return [record["loss"] for record in read_metrics(run_dir) if record["split"] == "train"]


def test_example_order_is_seeded_covers_every_example_each_epoch_and_resumes():
    order = ExampleOrder(count=10, batch_size=4, seed=3)
    first_epoch = order.next_indices() + order.next_indices() + order.next_indices()[:2]
    assert sorted(first_epoch) == list(range(10))
    copy = ExampleOrder(count=10, batch_size=4, seed=3)
    copy.load_state_dict(order.state_dict())
    assert [copy.next_indices() for _ in range(3)] == [order.next_indices() for _ in range(3)]
    with pytest.raises(BinaryLMError, match="resume with the same"):
        ExampleOrder(count=11, batch_size=4, seed=3).load_state_dict(order.state_dict())


def test_sft_lowers_the_loss_and_resume_is_exact(base, tmp_path):
    whole = sft(sft_config(base, tmp_path / "whole", steps=6), progress=False)
    sft(sft_config(base, tmp_path / "split", steps=3), progress=False)
    resumed = sft(sft_config(base, tmp_path / "split", steps=6), resume=True, progress=False)
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "whole")
    assert resumed["train_loss"] == whole["train_loss"]
    a, b = load_checkpoint(tmp_path / "whole").model, load_checkpoint(tmp_path / "split").model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    losses = train_losses(tmp_path / "whole")
    assert losses[-1] < losses[0]
    assert "after_accuracy" in whole and "accuracy_arithmetic" in str(read_metrics(tmp_path / "whole"))


@pytest.mark.parametrize("quantize_base", ["none", "int8"])
def test_lora_runs_save_the_adapter_alone_and_load_back_as_the_trained_model(base, tmp_path, quantize_base):
    config = sft_config(base, tmp_path / "lora", lora_rank=4, quantize_base=quantize_base)
    sft(config, progress=False)
    saved = tmp_path / "lora" / "ckpt-000006"
    assert (saved / "adapter.safetensors").is_file() and not (saved / "model.safetensors").exists()
    loaded = load_checkpoint(saved).model
    assert bool(lora_layers(loaded)) == (quantize_base != "none")  # a float base gets the adapter merged in
    if quantize_base == "none":  # a plain model, ready for the next stage to train in full
        assert all(parameter.requires_grad for parameter in loaded.parameters())
        next_stage = sft(sft_config(saved, tmp_path / "after-lora", steps=2), progress=False)
        assert next_stage["step"] == 2
    base_model = load_checkpoint(base).model
    ids = torch.randint(0, base_model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert not torch.allclose(loaded(ids)[0], base_model(ids)[0])  # the adapter changed the model
    resumed = sft(sft_config(base, tmp_path / "lora", steps=8, lora_rank=4, quantize_base=quantize_base),
                  resume=True, progress=False)
    assert resumed["step"] == 8


def test_sft_errors_name_the_fix(base, tmp_path, capsys):
    assert main(["finetune", "sft", "--train.out_dir", str(tmp_path / "a")]) == 2
    assert "--finetune.base" in capsys.readouterr().err
    assert main(["finetune", "sft", "--finetune.base", str(base), "--train.out_dir", str(tmp_path / "b"),
                 "--finetune.lora_rank", "4", "--finetune.lora_targets", "nothing"]) == 2
    assert "match no linear layer" in capsys.readouterr().err
    assert main(["finetune", "sft", "--finetune.base", str(base), "--train.out_dir", str(tmp_path / "c"),
                 "--finetune.train_examples", "0"]) == 2
    assert "nothing to fine-tune" in capsys.readouterr().err
    assert main(["finetune", "sft", "--finetune.base", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(BinaryLMError, match="needs adapters"):
        build_config({"finetune": {"quantize_base": "int4"}})


def test_the_demos_post_training_reports_task_accuracy_before_and_after_each_stage(base, tmp_path, monkeypatch):
    from binarylm import demo
    from binarylm.eval.report import write_report

    monkeypatch.setattr(demo, "SFT_STEPS", 4)
    monkeypatch.setattr(demo, "DPO_STEPS", 2)
    monkeypatch.setattr(demo, "POST_TASKS", ["arithmetic", "upper"])
    stages = demo._post_train(base, tmp_path, minutes=1.0, progress=False)
    assert [stage["stage"] for stage in stages] == ["sft", "dpo"] and stages[1]["step"] == 2
    evaluation = {"bits_per_byte": 1.0, "xz_bits_per_byte": 1.5, "bytes": 10, "tokens": 3, "loss": 1.0,
                  "perplexity": 2.7}
    report = write_report(tmp_path, "t", {}, evaluation, [], stages).read_text()
    assert "| task | before (pretrained) | after sft | after dpo |" in report
    assert f"| upper | {stages[0]['before_accuracy_upper']:.0%} | {stages[0]['after_accuracy_upper']:.0%} |" in report
