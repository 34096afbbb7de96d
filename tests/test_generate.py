"""Sampling and generation: KV cache against recomputation, seeds, top-k/top-p, stop strings, streaming."""

import warnings

import pytest
import torch
from torch import nn

from binarylm.config import ModelConfig
from binarylm.errors import BinaryLMError
from binarylm.infer import (
    GenerationConfig,
    TextStream,
    apply_top_k,
    apply_top_p,
    generate,
    generate_ids,
    sample_next,
)
from binarylm.model import KVCache, Transformer
from binarylm.tokenizer import train_bpe

CONTEXT = 64
VOCAB = 300
TEXT = (
    "the quick brown fox jumps over the lazy dog. "
    "def add(a, b):\n    return a + b\n"
    "café naïve — snow ☃ and more text for the merges to find. "
) * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], vocab_size=VOCAB, progress=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=VOCAB, context_length=CONTEXT, n_layer=2, n_head=2, d_model=32)).eval()


class ScriptedModel(nn.Module):
    """Predicts `script[i]` on its i-th forward, whatever the input; the forward/new_cache interface of Transformer."""

    def __init__(self, script: list[int], context_length: int = CONTEXT):
        super().__init__()
        self.config = ModelConfig(vocab_size=VOCAB, context_length=context_length, n_layer=1, n_head=1, d_model=4)
        self.script = list(script)
        self.calls = 0
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device

    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        return KVCache(1, batch_size, 1, max_length or self.config.context_length, 1)

    def forward(self, ids, targets=None, cache=None):
        B, T = ids.shape
        if cache is not None:
            cache.advance(T)
        logits = torch.zeros(B, T, VOCAB)  # (B, T, V)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 100.0
        self.calls += 1
        return logits, None


def byte_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: forces multi-byte characters to arrive split over tokens."""
    return [tokenizer.ranks[bytes([b])] for b in text.encode("utf-8")]


def run(model, tokenizer, prompt="the", **config):
    """Generate, collecting the streamed deltas."""
    deltas = []
    result = generate(model, tokenizer, prompt, GenerationConfig(**config), on_text=deltas.append)
    return result, deltas


# ------------------------------------------------------------- KV cache


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("prompt_length, new_tokens", [(1, 30), (5, 20), (17, 40), (60, 4), (63, 1)])
def test_cached_generation_equals_recomputation(model, prompt_length, new_tokens, temperature):
    """Greedy, and sampling with the same seed (a random model's greedy output repeats itself; samples do not)."""
    prompt = torch.randint(0, VOCAB, (prompt_length,), generator=torch.Generator().manual_seed(prompt_length))
    prompt = prompt.tolist()
    runs = [
        list(generate_ids(model, prompt, new_tokens, temperature=temperature, use_cache=use_cache,
                          generator=torch.Generator().manual_seed(3)))
        for use_cache in (True, False)
    ]
    assert runs[0] == runs[1]
    assert len(runs[0]) == new_tokens


def test_cache_prefills_once_then_feeds_one_token(model, monkeypatch):
    shapes = []
    forward = model.forward

    def spy(ids, targets=None, cache=None):
        shapes.append((tuple(ids.shape), cache is not None))
        return forward(ids, targets, cache)

    monkeypatch.setattr(model, "forward", spy)
    assert len(list(generate_ids(model, [1, 2, 3, 4], 5))) == 5
    assert shapes == [((1, 4), True)] + [((1, 1), True)] * 4  # the last token needs no forward


def test_generation_restores_mode_and_keeps_inference_mode_inside(model):
    model.train()
    try:
        steps = generate_ids(model, [1, 2], 3)
        for _ in steps:
            assert not model.training
            assert not torch.is_inference_mode_enabled()  # the caller's code between yields is unaffected
        assert model.training
    finally:
        model.eval()


# ------------------------------------------------------------- sampling


def test_same_seed_reproduces_and_different_seeds_differ(model, tokenizer):
    settings = dict(temperature=1.0, max_new_tokens=30, stop_at_eot=False)
    first, _ = run(model, tokenizer, seed=7, **settings)
    again, _ = run(model, tokenizer, seed=7, **settings)
    other, _ = run(model, tokenizer, seed=8, **settings)
    assert first.token_ids == again.token_ids and first.text == again.text
    assert first.token_ids != other.token_ids


@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (0, 1e-6), (5, 1e-6)])
def test_top_k_one_or_tiny_top_p_is_greedy(model, top_k, top_p):
    greedy = list(generate_ids(model, [5, 6, 7], 25, temperature=0.0))
    sampled = list(generate_ids(model, [5, 6, 7], 25, temperature=1.3, top_k=top_k, top_p=top_p,
                                generator=torch.Generator().manual_seed(0)))
    assert sampled == greedy


LOGITS = torch.tensor([[1.0, 2.0, 0.5, -1.0, 3.0, 0.0]])  # (1, V)
DRAWS = 40_000


def frequencies(ids: torch.Tensor) -> torch.Tensor:
    return torch.bincount(ids, minlength=LOGITS.shape[1]).float() / ids.numel()  # (V,)


def test_sample_next_follows_softmax_of_logits_over_temperature():
    generator = torch.Generator().manual_seed(0)
    draws = sample_next(LOGITS.expand(DRAWS, -1), temperature=0.7, generator=generator)  # (DRAWS,)
    assert draws.shape == (DRAWS,) and draws.dtype == torch.int64
    expected = torch.softmax(LOGITS[0] / 0.7, dim=-1)
    assert torch.allclose(frequencies(draws), expected, atol=0.01)


def test_top_k_and_top_p_sample_only_kept_tokens_in_proportion():
    generator = torch.Generator().manual_seed(1)
    draws = sample_next(LOGITS.expand(DRAWS, -1), temperature=1.0, top_k=3, generator=generator)
    kept = torch.tensor([4, 1, 0])
    assert set(draws.tolist()) <= set(kept.tolist())
    expected = torch.zeros(LOGITS.shape[1])
    expected[kept] = torch.softmax(LOGITS[0, kept], dim=-1)
    assert torch.allclose(frequencies(draws), expected, atol=0.01)

    # softmax(LOGITS) ranked: 0.61 (id 4), 0.22 (id 1), 0.08 (id 0), ... so p = 0.8 keeps ids 4 and 1.
    draws = sample_next(LOGITS.expand(DRAWS, -1), temperature=1.0, top_p=0.8, generator=generator)
    assert set(draws.tolist()) == {4, 1}


def test_temperature_zero_is_argmax_per_row():
    logits = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 1.0]])
    assert sample_next(logits, temperature=0.0).tolist() == [1, 0]


def test_apply_top_k_keeps_exactly_k_even_with_ties():
    kept = apply_top_k(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 2)
    assert torch.isfinite(kept).sum() == 2
    assert torch.equal(apply_top_k(LOGITS, 0), LOGITS)


def test_apply_top_p_always_keeps_the_most_likely_token():
    kept = apply_top_p(LOGITS, 1e-9)
    assert torch.isfinite(kept).nonzero().tolist() == [[0, 4]]
    assert torch.equal(apply_top_p(LOGITS, 1.0), LOGITS)


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_sampling_rejects_bad_arguments(args, message):
    with pytest.raises(BinaryLMError, match=message):
        sample_next(LOGITS, **args)
    with pytest.raises(BinaryLMError, match=message):
        generate_ids(ScriptedModel([1]), [1], 1, **{"temperature": 1.0, **args})


# ------------------------------------------------------------- text


def test_stop_string_cuts_text_and_streamed_deltas_join_to_it(tokenizer):
    script = tokenizer.encode_ordinary("the quick brown fox jumps over the lazy dog")
    result, deltas = run(ScriptedModel(script), tokenizer, stop_strings=["fox"], max_new_tokens=50)
    assert result.text == "the quick brown "
    assert result.finish_reason == "stop"
    assert "".join(deltas) == result.text


def test_stop_string_split_over_tokens_is_never_streamed(tokenizer):
    script = byte_ids(tokenizer, "ab STOP cd")
    result, deltas = run(ScriptedModel(script), tokenizer, stop_strings=["STOP", "xyz"], max_new_tokens=50)
    assert result.text == "ab " and result.finish_reason == "stop"
    assert "".join(deltas) == "ab "
    assert all("S" not in d for d in deltas)


def test_earliest_stop_string_wins(tokenizer):
    script = byte_ids(tokenizer, "one two three")
    result, _ = run(ScriptedModel(script), tokenizer, stop_strings=["three", "two"], max_new_tokens=50)
    assert result.text == "one "


def test_text_that_only_looked_like_a_stop_string_is_released(tokenizer):
    script = byte_ids(tokenizer, "a STOq b")
    result, deltas = run(ScriptedModel(script), tokenizer, stop_strings=["STOP"], max_new_tokens=8)
    assert result.text == "".join(deltas) == "a STOq b"
    assert result.finish_reason == "length"


def test_utf8_split_over_tokens_never_streams_half_a_character(tokenizer):
    text = "é naïve ☃"
    script = byte_ids(tokenizer, text)
    assert len(script) > len(text)  # the multi-byte characters really are split
    result, deltas = run(ScriptedModel(script), tokenizer, max_new_tokens=len(script))
    assert result.text == "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[0] == "é"  # nothing was streamed after the first byte alone


def test_a_character_cut_by_the_token_limit_ends_as_a_replacement(tokenizer):
    script = byte_ids(tokenizer, "aé")
    result, deltas = run(ScriptedModel(script), tokenizer, max_new_tokens=2)
    assert result.text == "".join(deltas) == "a\ufffd"


def test_text_stream_holds_back_a_possible_stop_string():
    stream = TextStream(["abc"])
    assert stream.push(b"xa") == "x"
    assert stream.push(b"b") == ""
    assert stream.push(b"d") == "abd"
    assert stream.push(b"abc tail") == "" and stream.stopped
    assert stream.finish() == "" and stream.text == "xabd"


def test_end_of_text_stops_without_its_text(tokenizer):
    eot = tokenizer.eot_id
    script = [*byte_ids(tokenizer, "hi"), eot, *byte_ids(tokenizer, "after")]
    result, deltas = run(ScriptedModel(script), tokenizer, max_new_tokens=20)
    assert result.text == "".join(deltas) == "hi"
    assert result.finish_reason == "eot"
    assert result.token_ids == byte_ids(tokenizer, "hi")


def test_stop_at_eot_off_generates_through_it(tokenizer):
    script = [*byte_ids(tokenizer, "hi"), tokenizer.eot_id, *byte_ids(tokenizer, "yo")]
    result, _ = run(ScriptedModel(script), tokenizer, max_new_tokens=5, stop_at_eot=False)
    assert result.text == "hi<|endoftext|>yo" and result.finish_reason == "length"


# ------------------------------------------------------------- prompt and budget


def long_prompt(tokenizer, at_least: int) -> str:
    prompt = "the quick brown fox "
    while len(tokenizer.encode(prompt)) < at_least:
        prompt += "jumps over the lazy dog "
    return prompt


def test_prompt_too_long_is_an_error_that_names_the_fix(model, tokenizer):
    with pytest.raises(BinaryLMError, match="--truncate-prompt"):
        generate(model, tokenizer, long_prompt(tokenizer, 100), GenerationConfig())


def test_truncate_left_keeps_the_end_of_the_prompt(model, tokenizer):
    with pytest.warns(UserWarning, match="keeping only its last 63"):
        result = generate(model, tokenizer, long_prompt(tokenizer, 100),
                          GenerationConfig(truncate_prompt="left", temperature=0.0, stop_at_eot=False))
    assert result.prompt_tokens == CONTEXT - 1
    assert len(result.token_ids) == 1 and result.finish_reason == "length"


def test_max_new_tokens_is_clipped_at_the_context(model, tokenizer):
    prompt = "the quick brown fox"
    prompt_tokens = len(tokenizer.encode(prompt))
    result, deltas = run(model, tokenizer, prompt, max_new_tokens=1000, stop_at_eot=False, seed=0)
    assert result.prompt_tokens == prompt_tokens
    assert len(result.token_ids) == CONTEXT - prompt_tokens
    assert result.finish_reason == "length"
    assert "".join(deltas) == result.text


def test_zero_new_tokens(model, tokenizer):
    result, deltas = run(model, tokenizer, max_new_tokens=0)
    assert (result.text, result.token_ids, result.finish_reason, deltas) == ("", [], "length", [])


def test_empty_prompt_starts_from_end_of_text(model, tokenizer):
    result, _ = run(model, tokenizer, "", max_new_tokens=3, temperature=0.0, stop_at_eot=False)
    assert result.prompt_tokens == 1
    assert result.token_ids[:1] == list(generate_ids(model, [tokenizer.eot_id], 1))


def test_empty_prompt_without_end_of_text_token_is_an_error(model):
    plain = train_bpe([TEXT], vocab_size=260, special_tokens=(), progress=False)
    with pytest.raises(BinaryLMError, match="give a prompt"):
        generate(model, plain, "", GenerationConfig())


@pytest.mark.parametrize(
    "prompt, max_new_tokens, message",
    [([], 1, "at least one"), ([1] * 60, 5, "at most 4 new tokens"), ([VOCAB], 1, "outside the model's vocabulary")],
)
def test_generate_ids_checks_its_arguments_at_the_call(prompt, max_new_tokens, message):
    with pytest.raises(BinaryLMError, match=message):
        generate_ids(ScriptedModel([1]), prompt, max_new_tokens)


def test_generation_config_is_validated(model, tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BinaryLMError, match="truncate_prompt"):
            generate(model, tokenizer, "x", GenerationConfig(truncate_prompt="right"))
        with pytest.raises(BinaryLMError, match="stop strings"):
            generate(model, tokenizer, "x", GenerationConfig(stop_strings=[""]))
