"""The transformer: one model class, configured by ModelConfig."""

from binarylm.model.gpt import Transformer
from binarylm.model.kv_cache import KVCache

__all__ = ["KVCache", "Transformer"]
