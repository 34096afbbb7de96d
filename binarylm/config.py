"""Typed configuration: dataclasses, YAML recipes, presets and dotted overrides.

A run is described by one `RunConfig` with four sections:

    model:     the network's shape            (ModelConfig)
    data:      where the tokens come from      (DataConfig)
    train:     how the optimisation runs       (TrainConfig)
    finetune:  post-training on top of a base  (FinetuneConfig; unused by pretraining)

A YAML recipe in configs/ sets any of these fields, and may start from a
model preset (`model: {preset: gpt2-124m}`). On the command line any field
can be overridden with its dotted name: `--train.lr 3e-4 --model.n_layer 4`.
A key that does not exist or a value of the wrong type is an error that
names the valid keys, never a silent default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from binarylm.errors import BinaryLMError


@dataclass
class ModelConfig:
    """The shape of the transformer: one model class, many architectures.

    The defaults are GPT-2's layout (LayerNorm, GELU MLP, learned positions, biases, tied head);
    the `llama-*` presets switch to RMSNorm, SwiGLU, rotary positions, grouped-query attention and
    no biases. Every option is a field here, never a second model class.
    """

    vocab_size: int = 8192
    context_length: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: int = 0  # width of the feed-forward layer; 0 means 4 * d_model (gelu) or ~8/3 * d_model (swiglu)
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and LayerNorms
    tie_embeddings: bool = True  # the output head shares the token embedding's weights
    norm_eps: float = 1e-5
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu (GPT-2) | swiglu (Llama)
    position: str = "learned"  # learned | sinusoidal | rope
    rope_base: float = 10000.0  # RoPE's theta: wavelengths run from 2*pi to about 2*pi*base
    rope_scaling: float = 1.0  # the factor by which RoPE's frequencies are slowed (1: not at all)
    rope_type: str = "linear"  # linear: every frequency / rope_scaling | llama3: only the slow ones (below)
    rope_original_context: int = 0  # llama3: the context the model was trained at before scaling
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / this are scaled whole
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original / this stay; between, a blend
    n_kv_heads: int = 0  # key/value heads; 0 means n_head (multi-head), 1 is multi-query, between is grouped
    sliding_window: int = 0  # each token attends to at most this many keys (itself included); 0 means all
    n_experts: int = 0  # mixture-of-experts feed-forward with this many experts; 0 means one dense MLP
    n_experts_active: int = 2  # experts each token is routed to (top-k)
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss added to the training loss

    def __post_init__(self) -> None:
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else _multiple_of(8 * self.d_model // 3, 64)
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_head

    def validate(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "d_model", "d_ff", "n_kv_heads"):
            if getattr(self, name) <= 0:
                raise BinaryLMError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise BinaryLMError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.n_head % self.n_kv_heads:
            raise BinaryLMError(
                f"model.n_head ({self.n_head}) must be divisible by model.n_kv_heads ({self.n_kv_heads}): "
                "each key/value head serves an equal group of query heads"
            )
        choices = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"),
                   "position": ("learned", "sinusoidal", "rope")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BinaryLMError(f"model.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise BinaryLMError(f"rotary positions need an even head size; d_model / n_head is {self.head_dim}")
        if self.rope_base <= 0 or self.rope_scaling <= 0:
            raise BinaryLMError("model.rope_base and model.rope_scaling must be positive")
        if self.rope_type not in ("linear", "llama3"):
            raise BinaryLMError(f"model.rope_type must be linear or llama3; got {self.rope_type!r}")
        if self.rope_type == "llama3" and not (
                self.rope_original_context > 0 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise BinaryLMError(
                "llama3 rope scaling needs model.rope_original_context > 0 and 0 < model.rope_low_freq_factor < "
                f"model.rope_high_freq_factor; got {self.rope_original_context}, {self.rope_low_freq_factor}, "
                f"{self.rope_high_freq_factor} (Llama 3.1 uses 8192, 1 and 4)"
            )
        if self.sliding_window < 0:
            raise BinaryLMError(f"model.sliding_window must be 0 (off) or positive, got {self.sliding_window}")
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.n_experts_active <= self.n_experts):
            raise BinaryLMError(
                f"model.n_experts_active ({self.n_experts_active}) must be between 1 and model.n_experts "
                f"({self.n_experts})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise BinaryLMError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def attention_span(self) -> int:
        """The most keys one query attends to."""
        return min(self.sliding_window or self.context_length, self.context_length)


def _multiple_of(value: int, step: int) -> int:
    return step * ((value + step - 1) // step)


@dataclass
class DataConfig:
    """The corpus and how it becomes training windows."""

    inputs: list[str] = field(default_factory=list)  # files / directories / .jsonl; empty = built-in corpus
    text_field: str = "text"  # the field holding the text in JSONL inputs
    tokenizer: str = ""  # a tokenizer.json (or cl100k_base); empty = train one for this run
    tokenizer_vocab_size: int = 8192  # when a tokenizer is trained for the run
    val_fraction: float = 0.05  # files held out for validation (by a hash of the path)
    stride: int = 0  # step between training windows; 0 means context_length (no overlap)


@dataclass
class TrainConfig:
    """The optimisation: batch, schedule, precision, checkpoints and logging."""

    out_dir: str = "runs/default"
    seed: int = 1337
    batch_size: int = 8  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    max_minutes: float = 0.0  # wall-clock budget for the loop; 0 means no budget
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1  # applied to matrices only, never to biases, norms or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2  # older checkpoints are deleted; the final one is always kept
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | float32 | bfloat16
    compile: str = "auto"  # auto | true | false; auto compiles on CUDA only (see benchmarks/RESULTS.md)
    threads: int = 0  # CPU threads for PyTorch; 0 means leave PyTorch's default

    def validate(self) -> None:
        positive = ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "save_every",
                    "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise BinaryLMError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise BinaryLMError(f"train.lr must be positive, got {self.lr}")
        # float16 is left out on purpose: it needs loss scaling, and bfloat16 does not.
        choices = {"dtype": ("auto", "float32", "bfloat16"), "compile": ("auto", "true", "false")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BinaryLMError(f"train.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")


FINETUNE_STAGES = ("sft", "classify", "dpo", "reward", "ppo", "grpo")
TRAIN_ON = ("assistant", "all", "last")


@dataclass
class FinetuneConfig:
    """Post-training: which base, which examples, and the adapters and objectives on top."""

    base: str = ""  # the checkpoint (or run directory) the stage starts from
    data: list[str] = field(default_factory=list)  # chat / instruction files; empty = the built-in tasks
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "reverse", "upper", "count"])  # built-in
    train_examples: int = 2000  # per built-in task
    test_examples: int = 50  # per built-in task, held out, scored by generation
    train_on: str = "assistant"  # which tokens SFT learns: assistant | all | last (the last assistant turn)
    max_length: int = 0  # longest training example in tokens; 0 means the model's context
    max_new_tokens: int = 32  # answer length when scoring a task by generation (the longest working is 25)
    lora_rank: int = 0  # 0 = full fine-tuning; > 0 = LoRA adapters of this rank on a frozen base
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "up", "down"])  # names or globs
    quantize_base: str = "none"  # none | int8 | int4: a quantized frozen base under the adapters (QLoRA)
    beta: float = 0.1  # DPO's strength of the pull towards the reference model
    group_size: int = 4  # GRPO: answers sampled per prompt (at least 2)
    kl_coef: float = 0.04  # GRPO / PPO: weight of the KL penalty to the reference; 0 keeps no reference
    clip_ratio: float = 0.2  # GRPO / PPO: the policy ratio is clipped to [1 - clip, 1 + clip]
    value_clip: float = 0.2  # PPO: how far a value estimate may move from its rollout value
    value_coef: float = 0.1  # PPO: weight of the value loss
    gae_gamma: float = 1.0  # PPO: discount per token
    gae_lambda: float = 0.95  # PPO: GAE's bias-variance trade-off
    rollout_temperature: float = 1.0  # GRPO / PPO: sampling temperature of the rollouts
    reward_model: str = ""  # PPO: a `finetune reward` checkpoint; empty scores answers with the task checkers
    text_field: str = "text"  # classify: the JSONL field holding the text
    label_field: str = "label"  # classify: the JSONL field holding the label (a string, integer or boolean)

    def validate(self) -> None:
        if self.train_on not in TRAIN_ON:
            raise BinaryLMError(f"finetune.train_on must be one of {', '.join(TRAIN_ON)}; got {self.train_on!r}")
        if self.quantize_base not in ("none", "int8", "int4"):
            raise BinaryLMError(f"finetune.quantize_base must be none, int8 or int4; got {self.quantize_base!r}")
        if self.quantize_base != "none" and self.lora_rank <= 0:
            raise BinaryLMError("finetune.quantize_base needs adapters to train: set finetune.lora_rank (e.g. 8)")
        for name in ("train_examples", "test_examples", "max_new_tokens"):
            if getattr(self, name) < 0:
                raise BinaryLMError(f"finetune.{name} must not be negative, got {getattr(self, name)}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> RunConfig:
        self.model.validate()
        self.train.validate()
        self.finetune.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "finetune": FinetuneConfig}

# Model sizes from a CPU toy to GPT-2's published shapes.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, d_model=64, context_length=64),
    "demo": dict(n_layer=4, n_head=4, d_model=256, context_length=256),
    "small": dict(n_layer=6, n_head=6, d_model=384, context_length=256),
    "gpt2-124m": dict(n_layer=12, n_head=12, d_model=768, context_length=1024, vocab_size=50257),
    "gpt2-350m": dict(n_layer=24, n_head=16, d_model=1024, context_length=1024, vocab_size=50257),
    "gpt2-774m": dict(n_layer=36, n_head=20, d_model=1280, context_length=1024, vocab_size=50257),
    "gpt2-1558m": dict(n_layer=48, n_head=25, d_model=1600, context_length=1024, vocab_size=50257),
}

# The Llama recipe: RMSNorm, SwiGLU, rotary positions, grouped-query attention, no biases.
LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, norm_eps=1e-5)
PRESETS.update({
    "llama-tiny": dict(LLAMA, n_layer=2, n_head=4, n_kv_heads=2, d_model=64, context_length=64),
    "llama-small": dict(LLAMA, n_layer=6, n_head=6, n_kv_heads=2, d_model=384, context_length=256),
    "llama-125m": dict(LLAMA, n_layer=12, n_head=12, n_kv_heads=4, d_model=768, context_length=2048,
                       vocab_size=32000, tie_embeddings=False),
    "llama-350m": dict(LLAMA, n_layer=24, n_head=16, n_kv_heads=4, d_model=1024, context_length=2048,
                       vocab_size=32000, tie_embeddings=False),
    # The shape of Llama 3.2 1B.
    "llama-1b": dict(LLAMA, n_layer=16, n_head=32, n_kv_heads=8, d_model=2048, d_ff=8192, context_length=8192,
                     vocab_size=128256, rope_base=500000.0),
})


def model_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise BinaryLMError(f"unknown model preset {name!r}{suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


# ------------------------------------------------------------------ building


def build_config(values: dict[str, Any] | None = None, overrides: dict[str, str] | None = None) -> RunConfig:
    """A validated RunConfig from nested values (as in YAML) plus dotted string overrides."""
    values = {section: dict(body or {}) for section, body in (values or {}).items()}
    for section in values:
        if section not in SECTIONS:
            raise BinaryLMError(
                f"unknown config section {section!r}{suggest(section, SECTIONS)}; sections: {', '.join(SECTIONS)}"
            )
    for dotted, text in (overrides or {}).items():
        section, key = _split_dotted(dotted)
        values.setdefault(section, {})[key] = _parse_override(SECTIONS[section], key, text, dotted)
    model_values = values.get("model", {})
    if "preset" in model_values:
        model_values = {**model_preset(model_values.pop("preset")), **model_values}
    sections = {
        "model": _make(ModelConfig, model_values, "model"),
        "data": _make(DataConfig, values.get("data", {}), "data"),
        "train": _make(TrainConfig, values.get("train", {}), "train"),
        "finetune": _make(FinetuneConfig, values.get("finetune", {}), "finetune"),
    }
    return RunConfig(**sections).validate()


def load_config(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> RunConfig:
    """Read a YAML recipe (or start from defaults) and apply dotted overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            recipes = sorted(p.name for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
            hint = f"; recipes in configs/: {', '.join(recipes)}" if recipes else ""
            raise BinaryLMError(f"config file {path} does not exist{hint}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise BinaryLMError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise BinaryLMError(f"{path} must hold a mapping with sections {', '.join(SECTIONS)}")
    try:
        return build_config(values, overrides)
    except BinaryLMError as exc:
        raise BinaryLMError(f"{path}: {exc}" if path else str(exc)) from None


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig saved with `to_dict` (as in a checkpoint's config.json)."""
    return build_config(values)


def _make(cls, values: dict[str, Any], section: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise BinaryLMError(
                f"unknown key {section}.{key}{suggest(key, fields)}; valid keys in {section}: {', '.join(fields)}"
            )
        values[key] = _check_type(value, _field_type(cls, key), f"{section}.{key}")
    return cls(**values)


def _field_type(cls, key: str):
    return typing.get_type_hints(cls)[key]


def _check_type(value: Any, expected, name: str) -> Any:
    """`value` if it fits `expected` (ints are accepted for floats), else a clear error."""
    origin = typing.get_origin(expected)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise BinaryLMError(f"{name} must be a list, got {value!r}")
        return [_check_type(item, item_type, name) for item in value]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(expected):
            try:
                return _check_type(value, option, name)
            except BinaryLMError as exc:
                errors.append(str(exc))
        raise BinaryLMError(errors[0])
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is type(None) and value is None:
        return None
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise BinaryLMError(f"{name} must be of type {expected.__name__}, got {value!r}")
    return value


def _split_dotted(dotted: str) -> tuple[str, str]:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or not key:
        raise BinaryLMError(
            f"override --{dotted} must be --SECTION.KEY with SECTION one of {', '.join(SECTIONS)} "
            "(for example --train.lr 3e-4)"
        )
    return section, key


def _parse_override(cls, key: str, text: str, dotted: str) -> Any:
    """Turn the command-line string for `key` into the field's type."""
    fields = {f.name for f in dataclasses.fields(cls)}
    if key == "preset" and cls is ModelConfig:
        return text
    if key not in fields:
        section = dotted.partition(".")[0]
        raise BinaryLMError(
            f"unknown key {dotted}{suggest(key, fields)}; valid keys in {section}: {', '.join(sorted(fields))}"
        )
    expected = _field_type(cls, key)
    if typing.get_origin(expected) is list:
        return [item for item in text.split(",") if item]
    if expected is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise BinaryLMError(f"--{dotted} must be true or false, got {text!r}")
        return lowered in ("true", "1", "yes")
    if expected in (int, float):
        try:
            return expected(text)
        except ValueError:
            raise BinaryLMError(f"--{dotted} must be a number of type {expected.__name__}, got {text!r}") from None
    return text


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`["--train.lr", "3e-4", "--model.n_layer=4"]` -> `{"train.lr": "3e-4", "model.n_layer": "4"}`."""
    overrides: dict[str, str] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise BinaryLMError(
                f"unexpected argument {arg!r}: settings are given as --SECTION.KEY VALUE (for example --train.lr 3e-4)"
            )
        name, has_value, value = arg[2:].partition("=")
        if not has_value:
            if index + 1 >= len(args):
                raise BinaryLMError(f"--{name} needs a value")
            index += 1
            value = args[index]
        overrides[name] = value
        index += 1
    return overrides
