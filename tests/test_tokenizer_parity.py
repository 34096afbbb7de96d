"""Our encoder against tiktoken's cl100k_base, id for id."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from binarylm.data.sources import read_texts, stdlib_files
from binarylm.errors import BinaryLMError

MIXED_SAMPLES = [
    "Hello, world! Ça va? Grüße aus Köln. Привет, мир! 你好，世界。 こんにちは 안녕하세요 مرحبا שלום",
    "emoji 😀😃🏳️‍🌈👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚 math",
    "whitespace:  two   three\t\ttabs\r\n\r\nCRLF \n\n\n   trailing   \u00a0nbsp\u2003em\u2028ls\u3000ideo  ",
    "numbers 1 12 123 1234 12345 3.14159 1e-10 0xFF ٣٤٥ ²³ Ⅻ",
    "contractions: don't I'M we've they'RE she'll he'd it's 'S 'ſ",
    "def f(x: int) -> dict[str, list[int]]:\n    return {'a': [x ** 2 for _ in range(10)]}  # comment\n",
    "",
    " ",
    "\n",
    "a" * 5000,
    " " * 3000 + "x",
    "<|endoftext|> written as text",
]


def test_whole_embedded_corpus_matches_tiktoken(ours_cl100k, tiktoken_cl100k):
    text = "".join(read_texts(stdlib_files("all")))
    assert len(text) > 10_000_000
    assert ours_cl100k.encode_ordinary(text) == tiktoken_cl100k.encode_ordinary(text)


@pytest.mark.parametrize("text", MIXED_SAMPLES)
def test_mixed_samples_match_tiktoken(ours_cl100k, tiktoken_cl100k, text):
    assert ours_cl100k.encode_ordinary(text) == tiktoken_cl100k.encode_ordinary(text)
    assert ours_cl100k.decode(ours_cl100k.encode_ordinary(text)) == text


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_fuzzed_unicode_matches_tiktoken(ours_cl100k, tiktoken_cl100k, text):
    assert ours_cl100k.encode_ordinary(text) == tiktoken_cl100k.encode_ordinary(text)


ALPHABET = st.sampled_from(list("aA1 \t\n\r'sS_.-(){}😀é中\u00a0\u2003٣") + ["<|endoftext|>", "<|fim_prefix|>"])


@settings(max_examples=400, deadline=None)
@given(st.lists(ALPHABET, max_size=40).map("".join))
def test_fuzzed_tricky_alphabet_matches_tiktoken(ours_cl100k, tiktoken_cl100k, text):
    """Characters where split patterns usually go wrong: spaces, newlines, quotes, digits, specials."""
    assert ours_cl100k.encode_ordinary(text) == tiktoken_cl100k.encode_ordinary(text)
    assert ours_cl100k.encode(text, allowed_special="all") == tiktoken_cl100k.encode(text, allowed_special="all")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3), st.text(max_size=5))
def test_lone_surrogates_are_replaced_like_tiktoken(ours_cl100k, tiktoken_cl100k, surrogates, text):
    mixed = text + surrogates + text
    assert ours_cl100k.encode_ordinary(mixed) == tiktoken_cl100k.encode_ordinary(mixed)


SPECIAL_TEXT = "a<|endoftext|>b<|fim_prefix|>c<|endofprompt|>"


def test_special_tokens_allowed_like_tiktoken(ours_cl100k, tiktoken_cl100k):
    for allowed in ("all", {"<|endoftext|>", "<|fim_prefix|>", "<|endofprompt|>"}):
        assert ours_cl100k.encode(SPECIAL_TEXT, allowed_special=allowed) == tiktoken_cl100k.encode(
            SPECIAL_TEXT, allowed_special=allowed
        )
    assert 100257 in ours_cl100k.encode(SPECIAL_TEXT, allowed_special="all")


def test_special_tokens_as_plain_text_like_tiktoken(ours_cl100k, tiktoken_cl100k):
    expected = tiktoken_cl100k.encode(SPECIAL_TEXT, disallowed_special=())
    assert ours_cl100k.encode(SPECIAL_TEXT, disallowed_special=()) == expected
    assert ours_cl100k.encode_ordinary(SPECIAL_TEXT) == expected
    partly = tiktoken_cl100k.encode(SPECIAL_TEXT, allowed_special={"<|endoftext|>"}, disallowed_special=())
    assert ours_cl100k.encode(SPECIAL_TEXT, allowed_special={"<|endoftext|>"}, disallowed_special=()) == partly


def test_disallowed_special_raises_like_tiktoken(ours_cl100k, tiktoken_cl100k):
    with pytest.raises(ValueError):
        tiktoken_cl100k.encode(SPECIAL_TEXT)
    with pytest.raises(BinaryLMError, match="<\\|endoftext\\|>.*allowed_special"):
        ours_cl100k.encode(SPECIAL_TEXT)
    with pytest.raises(ValueError):
        tiktoken_cl100k.encode(SPECIAL_TEXT, allowed_special={"<|endoftext|>"})
    with pytest.raises(BinaryLMError, match="fim_prefix"):
        ours_cl100k.encode(SPECIAL_TEXT, allowed_special={"<|endoftext|>"})


def test_unknown_special_token_name_is_a_clear_error(ours_cl100k):
    with pytest.raises(BinaryLMError, match="not special tokens of this tokenizer"):
        ours_cl100k.encode("x", allowed_special={"<|nope|>"})


def test_batch_encoding_matches_single(ours_cl100k, tiktoken_cl100k, val_texts):
    batch = ours_cl100k.encode_batch(val_texts, workers=2)
    assert batch == tiktoken_cl100k.encode_ordinary_batch(val_texts)


def test_decode_matches_tiktoken_on_partial_characters(ours_cl100k, tiktoken_cl100k):
    ids = tiktoken_cl100k.encode_ordinary("😀 é 中")
    for cut in range(len(ids) + 1):
        assert ours_cl100k.decode(ids[:cut]) == tiktoken_cl100k.decode(ids[:cut])
        assert ours_cl100k.decode_bytes(ids[:cut]) == tiktoken_cl100k.decode_bytes(ids[:cut])
