"""BinaryLM: a language model built from scratch, from raw text to a served model."""

__version__ = "0.1.0"
