"""Classification fine-tuning: a pretrained model becomes a text classifier.

    text -> ids + <|endoftext|> (B, T) -> embedding, blocks, final norm (B, T, C)
         -> the hidden state at each row's last real token (B, C) -> class head (B, K) -> cross-entropy

The language-model head is set aside and a new linear layer, the class head (d_model -> one
logit per class), reads the final hidden state of the last token. In a causal model only
that position has seen the whole text; an <|endoftext|> is appended so the position read
is always the same token, the one pretraining put after every document. Rows are padded
on the right, which the causal mask keeps invisible to the real tokens.

Data: JSONL files (`finetune.data`) of {"text": ..., "label": ...} records, labels strings,
integers or booleans (one kind per dataset), class ids given by the sorted labels; a hash
of the text holds out a test split. Without files the built-in verifiable tasks
(`finetune.tasks`) become a true/false task: is "What is 17 + 5? Answer: 22" right? Each
prompt appears once with its exact answer ("true") and once with a plausible wrong one
("false"), so the classes are balanced and only checking the answer tells them apart.

The stage runs on `finetune.start` / `finetune.train`: full fine-tuning, or LoRA / QLoRA
adapters over a frozen base, with the class head trained in full beside the model as one of
`Tuning.heads` (its own optimizer group, inside train.grad_clip's norm). Checkpoints stay
ordinary model (or adapter) checkpoints that every other command loads; the head is in
the checkpoint's heads.safetensors under the name "class":

    class.linear.weight (K, C), class.linear.bias (K,)   the layer
    class.labels_json (bytes, uint8)                      the labels in class-id order, as JSON text

The labels travel inside the head's own state, so a checkpoint says by itself which logit
means which label. `--resume` restores the head with the rest (after checking that the data
still gives the same labels); `load_classifier` loads all of it for prediction.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from binarylm import checkpoint
from binarylm.config import RunConfig
from binarylm.data.records import json_records
from binarylm.data.synthetic import TaskExample, check, split_of
from binarylm.errors import BinaryLMError
from binarylm.model import Transformer
from binarylm.tokenizer import Tokenizer
from binarylm.train import finetune
from binarylm.train.sft import test_tasks, train_tasks

log = logging.getLogger(__name__)

HEAD_NAME = "class"  # the head's name in Tuning.heads and in each checkpoint's heads.safetensors
BUILTIN_CLASSES = ("false", "true")  # the built-in task's labels: is the proposed answer right?

Label = str | int | bool


@dataclass(frozen=True)
class LabelledText:
    """One example: the `text`, its `label`, where it came from (for errors) and its built-in task, if any."""

    text: str
    label: Label
    where: str
    task: str = ""


@dataclass
class ClassificationData:
    """Training and held-out examples and the class labels, in class-id order."""

    train: list[LabelledText]
    test: list[LabelledText]
    classes: list[Label] = field(default_factory=list)

    def class_id(self, example: LabelledText) -> int:
        return self.classes.index(example.label)


# --------------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------------


def classify(config: RunConfig, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune finetune.base as a classifier until train.max_steps; return the final figures.

    Held-out accuracy is measured before training ("before_accuracy"), every train.eval_every
    steps and at the end ("after_accuracy"); each checkpoint holds the class head in heads.safetensors.
    """
    tuning = finetune.start("classify", config, resume)
    data = load_classification_data(config)
    longest = input_limit(config)
    tokenizer = tuning.tokenizer
    train_rows = [encode_text(tokenizer, example.text, longest) for example in data.train]
    train_labels = [data.class_id(example) for example in data.train]
    test_rows = [encode_text(tokenizer, example.text, longest) for example in data.test]
    test_labels = [data.class_id(example) for example in data.test]
    log.info("classify: %d classes %s, %d training and %d held-out examples", len(data.classes), data.classes,
             len(data.train), len(data.test))

    head = ClassHead(config.model.d_model, data.classes, config.train.seed)
    tuning.add_heads({HEAD_NAME: head})  # trained, clipped, saved and restored with the model
    order = finetune.ExampleOrder(len(train_rows), config.train.batch_size, config.train.seed)
    if resume:
        check_same_classes(tuning.run_dir, data.classes)
        finetune.restore(tuning, order)
    pad_id = finetune.pad_token_id(tokenizer)

    def loss(indices: list[int]) -> tuple[torch.Tensor, dict]:
        ids, lengths = finetune.pad_rows([train_rows[i] for i in indices], pad_id)  # (B, T), (B,)
        targets = torch.tensor([train_labels[i] for i in indices], device=tuning.device)  # (B,)
        logits = class_logits(tuning.model, head, ids.to(tuning.device), lengths.to(tuning.device))  # (B, K)
        value = F.cross_entropy(logits, targets)
        accuracy = (logits.argmax(dim=-1) == targets).float().mean().item()
        return tuning.model.with_balancing_loss(value), {"accuracy": accuracy}  # + MoE load balancing, if any

    def evaluate() -> dict:
        tasks = [example.task for example in data.test]
        return held_out_figures(tuning.model, head, test_rows, test_labels, tasks, config.train.batch_size, pad_id)

    return finetune.train(tuning, order, loss, evaluate, progress)


def input_limit(config: RunConfig) -> int:
    """The longest input in tokens: finetune.max_length, at most the model's context (0: the context)."""
    context = config.model.context_length
    return min(config.finetune.max_length or context, context)


# --------------------------------------------------------------------------------------------------------------
# The model side: hidden states, pooling and the head
# --------------------------------------------------------------------------------------------------------------


def class_logits(model: Transformer, head: ClassHead, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, K) class logits for right-padded ids (B, T) whose rows hold `lengths` (B,) real tokens."""
    pooled = finetune.last_token_states(model.hidden_states(ids), lengths)  # (B, C)
    return head(pooled)  # (B, K)


class ClassHead(nn.Module):
    """nn.Linear(d_model, K) from a pooled hidden state to class logits, carrying its K class labels.

    The labels are kept as a uint8 buffer of their JSON text, so they are saved and loaded with
    the weights (heads.safetensors) and a checkpoint needs nothing else to name its classes.
    """

    def __init__(self, d_model: int, classes: list[Label], seed: int = 0):
        super().__init__()
        self.linear = nn.Linear(d_model, len(classes))
        self.register_buffer("labels_json", encode_labels(classes))
        generator = torch.Generator().manual_seed(seed)  # the same initial head in every run with this seed
        with torch.no_grad():
            self.linear.weight.normal_(0.0, 0.02, generator=generator)  # GPT-2's initialisation
            self.linear.bias.zero_()

    @property
    def classes(self) -> list[Label]:
        return decode_labels(self.labels_json)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B, K)
        return self.linear(pooled.to(self.linear.weight.dtype))


def encode_labels(classes: list[Label]) -> torch.Tensor:
    """The labels' JSON text as a uint8 tensor (N,)."""
    return torch.tensor(list(json.dumps(list(classes)).encode("utf-8")), dtype=torch.uint8)


def decode_labels(codes: torch.Tensor) -> list[Label]:
    return json.loads(bytes(codes.cpu().tolist()).decode("utf-8"))


# --------------------------------------------------------------------------------------------------------------
# Text to ids, and batches
# --------------------------------------------------------------------------------------------------------------


def encode_text(tokenizer: Tokenizer, text: str, longest: int) -> list[int]:
    """The text's ids (its beginning, when too long) followed by <|endoftext|>, at most `longest` ids in all."""
    end = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    return tokenizer.encode_ordinary(text)[: longest - len(end)] + end


@torch.no_grad()
def held_out_figures(model: Transformer, head: ClassHead, rows: list[list[int]], labels: list[int],
                     tasks: list[str], batch_size: int, pad_id: int) -> dict[str, float]:
    """Accuracy and mean cross-entropy over the held-out examples, with accuracy per built-in task."""
    if not rows:
        return {}
    predictions, total_loss = [], 0.0
    for start in range(0, len(rows), batch_size):
        ids, lengths = finetune.pad_rows(rows[start: start + batch_size], pad_id)  # (B, T), (B,)
        targets = torch.tensor(labels[start: start + batch_size], device=model.device)  # (B,)
        logits = class_logits(model, head, ids.to(model.device), lengths.to(model.device)).float()  # (B, K)
        total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
        predictions += logits.argmax(dim=-1).tolist()
    right = [prediction == label for prediction, label in zip(predictions, labels)]
    figures = {"accuracy": sum(right) / len(right), "loss": total_loss / len(right)}
    for task in sorted(set(tasks) - {""}):
        marks = [mark for mark, of in zip(right, tasks) if of == task]
        figures[f"accuracy_{task}"] = sum(marks) / len(marks)
    return figures


# --------------------------------------------------------------------------------------------------------------
# Data: labelled JSONL files, or the built-in true/false task
# --------------------------------------------------------------------------------------------------------------


def load_classification_data(config: RunConfig) -> ClassificationData:
    """Examples from finetune.data (split by a hash of the text) or the built-in task, with their classes."""
    tune = config.finetune
    if tune.data:
        text_field = tune.text_field
        label_field = tune.label_field
        examples = [example for path in tune.data for example in read_labelled_texts(path, text_field, label_field)]
        train = [example for example in examples if split_of(example.text) == "train"]
        test = [example for example in examples if split_of(example.text) == "test"]
        if not train:
            raise BinaryLMError(f"all {len(examples)} examples fell in the held-out split (a hash of the text picks "
                                "about a fifth); give more examples")
    else:
        train = builtin_examples(train_tasks(config))  # the items SFT trains on, and holds out, for these settings
        test = builtin_examples(test_tasks(config))
        if not train:
            raise BinaryLMError("there is nothing to classify: give --finetune.data FILE.jsonl with "
                                "{\"text\": ..., \"label\": ...} lines, or built-in --finetune.tasks with "
                                "--finetune.train_examples above 0")
    if not test:
        log.warning("classify: no held-out examples, so no accuracy is reported; give more examples")
    return ClassificationData(train, test, class_labels(train + test))


def read_labelled_texts(path: str | Path, text_field: str = "text", label_field: str = "label") -> list[LabelledText]:
    """The {text_field: str, label_field: str | int | bool} records of a JSONL file, one per line.

    Problems name the file and line: malformed JSON, a line that is not an object, a missing or
    non-text text, a missing or unusable label, and a file without records.
    """
    shape = f"{{\"{text_field}\": ..., \"{label_field}\": ...}}"
    examples = [_labelled_text(record, where, text_field, label_field) for where, record in json_records(path, shape)]
    if not examples:
        raise BinaryLMError(f"{path} holds no examples; give one {shape} object per line")
    return examples


def _labelled_text(record: dict, where: str, text_field: str, label_field: str) -> LabelledText:
    text, label = record.get(text_field), record.get(label_field)
    if not isinstance(text, str) or not text.strip():
        found = "no such field" if text_field not in record else f"{type(text).__name__} {text!r}"[:80]
        raise BinaryLMError(f"{where}: \"{text_field}\" must be a non-empty string ({found}; the record has "
                            f"{sorted(record)})")
    if label_field not in record:
        raise BinaryLMError(f"{where}: no \"{label_field}\" field (the record has {sorted(record)}); every example "
                            "needs a label")
    if not isinstance(label, str | int) or isinstance(label, str) and not label.strip():
        raise BinaryLMError(f"{where}: \"{label_field}\" must be a non-empty string, an integer or a boolean, "
                            f"got {label!r}")
    return LabelledText(text, label, where)


def class_labels(examples: list[LabelledText]) -> list[Label]:
    """The distinct labels, sorted: class k is the k-th. One kind of label per dataset, at least two classes."""
    if not examples:
        raise BinaryLMError("the dataset is empty; give labelled examples")
    kind = _label_kind(examples[0].label)
    odd = next((example for example in examples if _label_kind(example.label) != kind), None)
    if odd is not None:
        raise BinaryLMError(f"{odd.where}: label {odd.label!r} is a {_label_kind(odd.label)} but the first label "
                            f"({examples[0].where}) is a {kind}; use one kind of label throughout")
    classes = sorted({example.label for example in examples})
    if len(classes) < 2:
        raise BinaryLMError(f"every example has the label {classes[0]!r}; a classifier needs at least two classes")
    return classes


def _label_kind(label: Label) -> str:
    return "boolean" if isinstance(label, bool) else "number" if isinstance(label, int) else "string"


def builtin_examples(items: list[TaskExample]) -> list[LabelledText]:
    """Built-in task items as true/false statements: each prompt with its right answer and with a wrong one."""
    examples = []
    for item in items:
        where = f"built-in {item.task}: {item.prompt!r}"
        examples.append(LabelledText(statement(item.prompt, item.answer), "true", where, item.task))
        if not check(item.task, item.rejected, item.answer):  # always wrong by construction; never mislabel
            examples.append(LabelledText(statement(item.prompt, item.rejected), "false", where, item.task))
    return examples


def statement(prompt: str, answer: str) -> str:
    """'What is 17 + 25? Answer: 42': the text the built-in task classifies as a right or wrong answer."""
    return f"{prompt} Answer: {answer}"


# --------------------------------------------------------------------------------------------------------------
# Resuming and loading the head
# --------------------------------------------------------------------------------------------------------------


def saved_classes(path: str | Path) -> list[Label]:
    """The class labels of a classify checkpoint (or run directory), from its heads.safetensors."""
    found = checkpoint.resolve_checkpoint(path)
    try:
        tensors = load_file(str(found / checkpoint.HEADS))
    except (OSError, SafetensorError):
        tensors = {}
    codes = tensors.get(f"{HEAD_NAME}.labels_json")
    if codes is None:
        raise BinaryLMError(f"{found} has no class head (no {HEAD_NAME}.* in {checkpoint.HEADS}): it is not a "
                            "checkpoint of `binarylm finetune classify`")
    return decode_labels(codes)


def check_same_classes(run_dir: Path, classes: list[Label]) -> None:
    """Refuse to resume a run whose saved head names other classes than the data gives now."""
    before = saved_classes(run_dir)
    if before != list(classes):
        raise BinaryLMError(f"{run_dir} was trained on the classes {before} but the data now gives {list(classes)}; "
                            "resume with the same finetune.* data settings")


@dataclass
class Classifier:
    """A trained classifier: the model, its class head and the tokenizer; `max_length` cuts long texts."""

    model: Transformer
    head: ClassHead
    tokenizer: Tokenizer
    max_length: int

    @property
    def classes(self) -> list[Label]:
        return self.head.classes

    @torch.no_grad()
    def logits(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """(N, K) class logits, float32, for N texts."""
        pad_id = finetune.pad_token_id(self.tokenizer)
        rows = [encode_text(self.tokenizer, text, self.max_length) for text in texts]
        device = self.model.device
        pieces = []
        for start in range(0, len(rows), batch_size):
            ids, lengths = finetune.pad_rows(rows[start: start + batch_size], pad_id)  # (B, T), (B,)
            pieces.append(class_logits(self.model, self.head, ids.to(device), lengths.to(device)).float())
        return torch.cat(pieces) if pieces else torch.empty(0, len(self.classes))

    def predict(self, texts: list[str]) -> list[Label]:
        """The likeliest label of each text."""
        classes = self.classes
        return [classes[index] for index in self.logits(texts).argmax(dim=-1).tolist()]


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """A `finetune classify` checkpoint (or its run directory) ready to predict, in eval mode on `device`."""
    classes = saved_classes(path)
    saved = checkpoint.load_checkpoint(path, device=device)
    head = ClassHead(saved.model.config.d_model, classes)
    checkpoint.load_heads(saved.path, {HEAD_NAME: head})
    return Classifier(saved.model, head.to(device).eval(), saved.tokenizer, input_limit(saved.config))
