"""Schema fuzzing: requests generated from the server's own OpenAPI spec never get a 5xx."""

import pytest
import torch

from binarylm.config import ModelConfig
from binarylm.infer.engine import Engine
from binarylm.model import Transformer
from binarylm.tokenizer import train_bpe

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from binarylm.serve.app import create_app  # noqa: E402
from binarylm.serve.runner import EngineRunner  # noqa: E402


def _app():
    tokenizer = train_bpe(["def f(x):\n    return x + 1\n"] * 30, vocab_size=300, progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=32, n_layer=1, n_head=2,
                                    d_model=16)).eval()
    runner = EngineRunner(Engine(model, tokenizer, max_batch=4)).start()
    return create_app(runner, tokenizer, "tiny")


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_the_schema_allows_gets_a_server_error(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
