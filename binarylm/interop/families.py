"""Which outside architecture family a BinaryLM model config is, if any.

A BinaryLM config can mix options no published architecture has (rotary positions
with LayerNorm, a mixture of experts with GELU experts, ...). Exporters only
accept the combinations that the target format can express, and say which
option is in the way otherwise.
"""

from __future__ import annotations

from binarylm.config import ModelConfig
from binarylm.errors import BinaryLMError

# Each family's required settings, as (field, value).
FAMILIES: dict[str, dict[str, object]] = {
    "gpt2": dict(norm="layernorm", mlp="gelu", position="learned", bias=True, n_experts=0, sliding_window=0),
    "llama": dict(norm="rmsnorm", mlp="swiglu", position="rope", n_experts=0),
}


def model_family(config: ModelConfig, supported: tuple[str, ...] = ("gpt2", "llama")) -> str:
    """'gpt2' or 'llama' (or whichever of `supported` the config matches); a clear error otherwise."""
    mismatches = {}
    for family in supported:
        wrong = {key: value for key, value in FAMILIES[family].items() if getattr(config, key) != value}
        if family == "gpt2" and config.n_kv_heads != config.n_head:
            wrong["n_kv_heads"] = config.n_head
        if not wrong:
            return family
        mismatches[family] = wrong
    reasons = "; ".join(
        f"{family} needs " + ", ".join(f"model.{key}={value}" for key, value in wrong.items())
        for family, wrong in mismatches.items()
    )
    raise BinaryLMError(f"this model matches no exportable architecture ({reasons})")
