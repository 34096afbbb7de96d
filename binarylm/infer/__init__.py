"""Inference: sampling the next token, and generating text from a prompt.

    from binarylm.infer import GenerationConfig, generate
    result = generate(model, tokenizer, "Once upon a time", GenerationConfig(temperature=0.8, seed=1))
    result.text, result.finish_reason
"""

from binarylm.infer.generate import (
    GenerationConfig,
    GenerationResult,
    TextStream,
    generate,
    generate_ids,
)
from binarylm.infer.sampling import apply_top_k, apply_top_p, check_sampling_args, sample_next

__all__ = [
    "GenerationConfig", "GenerationResult", "TextStream", "apply_top_k", "apply_top_p", "check_sampling_args",
    "generate", "generate_ids", "sample_next",
]
