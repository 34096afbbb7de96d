"""decode(encode(s)) == s, for every string."""

from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_trained_tokenizer_roundtrips_any_unicode(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode_ordinary(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_cl100k_roundtrips_any_unicode(ours_cl100k, text):
    assert ours_cl100k.decode(ours_cl100k.encode(text, disallowed_special=())) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "x", " ", "\n", "é"]), max_size=20))
def test_roundtrip_with_special_tokens(small_tokenizer, parts):
    text = "".join(parts)
    assert small_tokenizer.decode(small_tokenizer.encode(text, allowed_special="all")) == text


def test_bytes_roundtrip_across_split_characters(small_tokenizer):
    text = "naïve 😀 中文"
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode_bytes(ids) == text.encode("utf-8")
