"""The fast `re` splitter against the `regex` engine the patterns are written for."""

import pytest
import regex
import unicodedata2
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from binarylm.data.sources import read_texts, stdlib_files
from binarylm.errors import BinaryLMError
from binarylm.tokenizer.patterns import GPT2_PATTERN, GPT4_PATTERN, compile_pattern, resolve_pattern

BUILT_IN = [GPT2_PATTERN, GPT4_PATTERN]


def same_class_in_both_unicode_versions(text: str) -> bool:
    """True unless `text` has a character that `regex`'s newer Unicode classes differently.

    Our built-in classes follow Unicode 16.0 (tiktoken's); the `regex` module
    may know a later version, where a few thousand new code points became letters.
    """
    return all(
        bool(regex.match(r"[\p{L}\p{N}]", c)) == (unicodedata2.category(c)[0] in "LN") for c in text
    )


@pytest.mark.parametrize("pattern", BUILT_IN, ids=["gpt2", "gpt4"])
def test_fast_split_equals_regex_on_the_corpus(pattern):
    text = "".join(read_texts(stdlib_files("val")))
    assert compile_pattern(pattern).findall(text) == regex.findall(pattern, text)


@pytest.mark.parametrize("pattern", BUILT_IN, ids=["gpt2", "gpt4"])
@settings(max_examples=400, deadline=None)
@given(text=st.text())
def test_fast_split_equals_regex_on_any_unicode(pattern, text):
    assume(same_class_in_both_unicode_versions(text))
    assert compile_pattern(pattern).findall(text) == regex.findall(pattern, text)


def test_astral_characters_keep_their_class():
    text = "ab😀cd 𝔘𝔫𝔦x 𝟘𝟙𝟚𝟛4 ª² §"
    assert compile_pattern(GPT4_PATTERN).findall(text) == regex.findall(GPT4_PATTERN, text)
    assert "𝔘𝔫𝔦x" in "".join(compile_pattern(GPT4_PATTERN).findall(text))


def test_names_resolve_and_custom_patterns_pass_through():
    assert resolve_pattern("gpt4") == GPT4_PATTERN
    assert resolve_pattern("gpt2") == GPT2_PATTERN
    assert compile_pattern(resolve_pattern(r"\w+|\W")).findall("a b") == ["a", " ", "b"]
    with pytest.raises(BinaryLMError, match="gpt2, gpt4"):
        resolve_pattern("[")


CUT_ALPHABET = st.sampled_from(list("aZ1 \n\r\t)'s_😀𝔘𝟘\u00a0ª§") + ["\n\n", "x\ny", ")\nA"])


@pytest.mark.parametrize("pattern", BUILT_IN, ids=["gpt2", "gpt4"])
@settings(max_examples=600, deadline=None)
@given(parts=st.lists(CUT_ALPHABET, max_size=60))
def test_fast_split_equals_regex_around_astral_characters_and_line_breaks(pattern, parts):
    """Stretches with astral characters are cut out at line breaks: the cuts must change nothing."""
    text = "".join(parts)
    assert compile_pattern(pattern).findall(text) == regex.findall(pattern, text)


def test_letters_follow_unicode_16_like_tiktoken(ours_cl100k, tiktoken_cl100k):
    """U+13460 became a letter in Unicode 16.0, U+18D80 only in 17.0: tiktoken knows 16.0."""
    for text in ("\U00013460^K", "\U00018d80^K", "x\U00018d80y"):
        assert ours_cl100k.encode_ordinary(text) == tiktoken_cl100k.encode_ordinary(text)
