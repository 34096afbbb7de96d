"""Classification fine-tuning: a class head on the last token, its checkpoints, exact resume, LoRA, and bad data."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from binarylm.checkpoint import HEADS, load_checkpoint
from binarylm.config import build_config
from binarylm.data.synthetic import make_examples, split_of
from binarylm.errors import BinaryLMError
from binarylm.model import Transformer
from binarylm.model.lora import lora_layers
from binarylm.train.classify import (
    ClassHead,
    LabelledText,
    builtin_examples,
    class_labels,
    classify,
    load_classifier,
    read_labelled_texts,
    saved_classes,
    statement,
)
from binarylm.train.monitor import read_metrics


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The runs here use one thread (train.threads); later tests get PyTorch's setting back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def classify_config(base, out_dir, steps: int = 6, **finetune):
    values = {"finetune": {"base": str(base), "tasks": ["arithmetic", "upper"], "train_examples": 30,
                           "test_examples": 6, **finetune},
              "train": {"out_dir": str(out_dir), "max_steps": steps, "batch_size": 4, "grad_accum": 2,
                        "eval_every": 100, "save_every": 3, "log_every": 1, "warmup_steps": 2, "lr": 3e-3,
                        "threads": 1}}
    return build_config(values)


def train_losses(run_dir) -> list[float]:
    return [record["loss"] for record in read_metrics(run_dir) if record["split"] == "train"]


def write_jsonl(path, lines) -> str:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


@pytest.mark.parametrize("shape", [{"preset": "tiny"}, {"preset": "tiny", "position": "sinusoidal"},
                                   {"preset": "llama-tiny"}], ids=["learned", "sinusoidal", "rope"])
def test_hidden_states_are_what_the_lm_head_reads(shape):
    torch.manual_seed(0)
    model = Transformer(build_config({"model": {**shape, "vocab_size": 300}}).model).eval()
    ids = torch.randint(0, 300, (2, 17))  # (B, T)
    with torch.no_grad():
        logits, _ = model(ids)  # (B, T, V)
        assert torch.allclose(model.lm_head(model.hidden_states(ids)), logits, atol=1e-5)


def test_builtin_task_is_balanced_true_or_false_statements_with_disjoint_splits():
    items = make_examples("arithmetic", 20, "train", seed=1)
    train = builtin_examples(items + make_examples("reverse", 20, "train", seed=1))
    test = builtin_examples(make_examples("arithmetic", 5, "test") + make_examples("reverse", 5, "test"))
    assert [example.label for example in train].count("true") == 40 == len(train) / 2
    assert train[0] == LabelledText(statement(items[0].prompt, items[0].answer), "true", train[0].where, "arithmetic")
    assert train[1].text == statement(items[0].prompt, items[0].rejected) and train[1].label == "false"
    assert train[0].text.startswith("What is ") and " Answer: " in train[0].text
    assert not {example.text for example in train} & {example.text for example in test}
    assert class_labels(train + test) == ["false", "true"]


def test_classify_logs_accuracy_saves_the_head_and_resumes_exactly(base, tmp_path):
    whole = classify(classify_config(base, tmp_path / "whole", steps=6), progress=False)
    classify(classify_config(base, tmp_path / "split", steps=3), progress=False)
    resumed = classify(classify_config(base, tmp_path / "split", steps=6), resume=True, progress=False)
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "whole")
    assert resumed["train_loss"] == whole["train_loss"] and resumed["after_accuracy"] == whole["after_accuracy"]

    saved = tmp_path / "whole" / "ckpt-000006"
    assert (saved / HEADS).is_file() and (saved / "model.safetensors").is_file()
    assert (tmp_path / "whole" / "ckpt-000003" / HEADS).is_file()  # every checkpoint, not only the last
    assert saved_classes(saved) == ["false", "true"]
    heads = [load_file(str(tmp_path / run / "ckpt-000006" / HEADS)) for run in ("whole", "split")]
    assert heads[0]["class.linear.weight"].shape == (2, 64) and heads[0]["class.linear.bias"].shape == (2,)
    assert heads[0].keys() == heads[1].keys() and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    first_head = ClassHead(64, ["false", "true"], seed=classify_config(base, tmp_path).train.seed)
    assert not torch.equal(heads[0]["class.linear.weight"], first_head.linear.weight)  # the head trained

    records = {record["split"]: record for record in read_metrics(tmp_path / "whole") if record["split"] != "train"}
    assert {"accuracy", "loss", "accuracy_arithmetic", "accuracy_upper"} <= records["before"].keys()
    assert 0.0 <= whole["before_accuracy"] <= 1.0 and "after_accuracy" in whole
    assert all("accuracy" in record for record in read_metrics(tmp_path / "whole") if record["split"] == "train")

    load_checkpoint(saved)  # still an ordinary checkpoint for every other command
    classifier = load_classifier(tmp_path / "whole")
    assert classifier.classes == ["false", "true"]
    assert set(classifier.predict(["What is 2 + 2? Answer: 4", "Upper: cat Answer: CAt"])) <= {"false", "true"}


def test_classify_learns_a_keyword_task_from_a_file(base, tmp_path):
    rng = random.Random(0)
    lines = []
    for number in range(160):
        keyword = rng.choice(["import", "return"])
        words = [rng.choice(["x", "data", "value", "self"]) for _ in range(rng.randint(1, 3))]
        words.insert(rng.randrange(len(words) + 1), keyword)
        lines.append({"body": f"{' '.join(words)} {number}", "kind": keyword})
    data = write_jsonl(tmp_path / "keywords.jsonl", lines)
    config = classify_config(base, tmp_path / "run", steps=80, data=[data])
    config.train.batch_size, config.train.grad_accum, config.train.save_every = 8, 1, 100
    config.finetune.text_field, config.finetune.label_field = "body", "kind"  # the fields asked for in the report
    metrics = classify(config, progress=False)
    assert metrics["after_accuracy"] >= 0.9 > metrics["before_accuracy"]
    classifier = load_classifier(tmp_path / "run")
    held_out = [line for line in lines if split_of(line["body"]) == "test"]
    predictions = classifier.predict([line["body"] for line in held_out])
    assert sum(p == line["kind"] for p, line in zip(predictions, held_out)) / len(held_out) == metrics["after_accuracy"]


def test_lora_classification_trains_the_head_over_a_frozen_base(base, tmp_path):
    metrics = classify(classify_config(base, tmp_path / "lora", lora_rank=4), progress=False)
    saved = tmp_path / "lora" / "ckpt-000006"
    assert (saved / "adapter.safetensors").is_file() and not (saved / "model.safetensors").exists()
    assert (saved / HEADS).is_file() and metrics["step"] == 6
    classifier = load_classifier(saved)
    assert not lora_layers(classifier.model)  # the float base got its adapter merged in
    initial = ClassHead(64, ["false", "true"], seed=classify_config(base, tmp_path).train.seed)
    assert not torch.equal(classifier.head.linear.weight, initial.linear.weight)  # the head trains under LoRA
    resumed = classify(classify_config(base, tmp_path / "lora", steps=8, lora_rank=4), resume=True, progress=False)
    assert resumed["step"] == 8


def test_data_problems_are_reported_with_file_and_line(tmp_path):
    good = {"text": "fine", "label": "a"}
    cases = [
        ([good, "{not json"], "line 2: malformed JSON"),
        ([good, {"text": "no label"}], "line 2: no \"label\" field"),
        ([{"label": "a"}], "line 1: \"text\" must be a non-empty string"),
        ([good, {"text": "x", "label": 1.5}], "line 2: \"label\" must be a non-empty string, an integer"),
        ([good, "[1, 2]"], "line 2: expected a"),
        ([], "holds no examples"),
    ]
    for number, (lines, message) in enumerate(cases):
        path = write_jsonl(tmp_path / f"case{number}.jsonl", lines)
        with pytest.raises(BinaryLMError, match=message.replace("(", r"\(")):
            read_labelled_texts(path)
    mixed = read_labelled_texts(write_jsonl(tmp_path / "mixed.jsonl", [good, good, {"text": "y", "label": 3}]))
    with pytest.raises(BinaryLMError, match=r"line 3: label 3 is a number but the first label \(.*line 1\) is a"):
        class_labels(mixed)
    single = read_labelled_texts(write_jsonl(tmp_path / "single.jsonl", [good, {"text": "other", "label": "a"}]))
    with pytest.raises(BinaryLMError, match="at least two classes"):
        class_labels(single)
    numbers = read_labelled_texts(write_jsonl(tmp_path / "ints.jsonl", [{"text": "p", "label": 2},
                                                                          {"text": "q", "label": 0}]))
    assert class_labels(numbers) == [0, 2]
    with pytest.raises(BinaryLMError, match="is not a file"):
        read_labelled_texts(tmp_path / "missing.jsonl")


def test_classify_refuses_an_empty_dataset(base, tmp_path):
    with pytest.raises(BinaryLMError, match="nothing to classify"):
        classify(classify_config(base, tmp_path / "empty", train_examples=0), progress=False)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(BinaryLMError, match="holds no examples"):
        classify(classify_config(base, tmp_path / "empty-file", data=[empty]), progress=False)


def test_resume_with_other_classes_and_loading_a_plain_checkpoint_are_refused(base, tmp_path):
    texts = [f"example {number}" for number in range(40)]
    first = write_jsonl(tmp_path / "first.jsonl", [{"text": t, "label": "xy"[n % 2]} for n, t in enumerate(texts)])
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": t, "label": "xz"[n % 2]} for n, t in enumerate(texts)])
    classify(classify_config(base, tmp_path / "run", steps=2, data=[first]), progress=False)
    with pytest.raises(BinaryLMError, match=r"trained on the classes \['x', 'y'\] but the data now gives"):
        classify(classify_config(base, tmp_path / "run", steps=4, data=[other]), resume=True, progress=False)
    with pytest.raises(BinaryLMError, match="not a checkpoint of `binarylm finetune classify`"):
        load_classifier(base)
