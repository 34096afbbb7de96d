"""The fast trainer against the textbook one, and the trainer's contract."""

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from binarylm.errors import BinaryLMError
from binarylm.tokenizer import GPT2_PATTERN, train_bpe
from binarylm.tokenizer.naive import encode_naive, train_naive
from binarylm.tokenizer.train import count_pieces, learn_merges, tokenizer_from_merges


def test_fast_trainer_learns_exactly_the_naive_merges(val_texts):
    corpus = val_texts[:6]
    naive = train_naive(corpus, num_merges=400)
    fast = train_bpe(corpus, vocab_size=256 + 400 + 4, progress=False)
    assert len(naive) == 400
    assert fast.merges == naive


def test_fast_trainer_matches_naive_with_gpt2_pattern_and_runs_of_one_byte():
    corpus = ["aaaa aaa aa a aaaaaaa", "    x = 1\n        y = 2\n", "abababab abab", "zzz" * 50] * 3
    naive = train_naive(corpus, num_merges=30, pattern="gpt2")
    fast = tokenizer_from_merges(learn_merges(_piece_bytes(corpus, GPT2_PATTERN), 30, progress=False),
                                 GPT2_PATTERN, [])
    assert fast.merges == naive


def _piece_bytes(corpus, pattern):
    from binarylm.tokenizer.train import _piece_bytes as piece_bytes

    return piece_bytes(count_pieces(corpus, pattern))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab \nc1é", max_size=30), min_size=1, max_size=8), st.integers(1, 40))
def test_fast_trainer_matches_naive_on_random_corpora(corpus, num_merges):
    naive = train_naive(corpus, num_merges)
    fast = learn_merges(_piece_bytes(corpus, "gpt4"), num_merges, progress=False) if "".join(corpus) else []
    assert fast == naive


def test_fast_encoder_matches_naive_encoder(val_texts, small_tokenizer):
    text = val_texts[-1][:20_000]
    assert small_tokenizer.encode_ordinary(text) == encode_naive(text, small_tokenizer.merges)


def test_training_is_deterministic(val_texts):
    first = train_bpe(val_texts[:10], vocab_size=600, progress=False)
    second = train_bpe(iter(val_texts[:10]), vocab_size=600, progress=False)
    assert first.merges == second.merges


def test_vocab_layout_bytes_then_merges_then_specials(small_tokenizer):
    assert small_tokenizer.vocab_size == 1024
    assert small_tokenizer.special_tokens == {
        "<|endoftext|>": 1020, "<|pad|>": 1021, "<|im_start|>": 1022, "<|im_end|>": 1023,
    }
    assert small_tokenizer.ranks[b"a"] == ord("a")
    left, right = small_tokenizer.merges[0]
    assert small_tokenizer.ranks[small_tokenizer.token_bytes[left] + small_tokenizer.token_bytes[right]] == 256


def test_learned_tokens_compress_the_training_text(val_texts, small_tokenizer):
    text = "".join(val_texts[:5])
    assert len(text.encode()) / len(small_tokenizer.encode_ordinary(text)) > 2.5


def test_special_tokens_encode_to_their_ids(small_tokenizer):
    ids = small_tokenizer.encode("<|im_start|>user\nhi<|im_end|>", allowed_special="all")
    assert ids[0] == 1022 and ids[-1] == 1023
    assert small_tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>"


def test_vocab_size_too_small_is_a_clear_error():
    with pytest.raises(BinaryLMError, match="vocab size 259 is too small.*at least 260"):
        train_bpe(["hello"], vocab_size=259, progress=False)


def test_empty_corpus_is_a_clear_error():
    with pytest.raises(BinaryLMError, match="corpus is empty"):
        train_bpe([], vocab_size=300, progress=False)
    with pytest.raises(BinaryLMError, match="corpus is empty"):
        train_bpe(["", ""], vocab_size=300, progress=False)


def test_bad_pattern_is_a_clear_error():
    with pytest.raises(BinaryLMError, match="not a valid regular expression"):
        train_bpe(["hello"], vocab_size=300, pattern="(unclosed", progress=False)


def test_running_out_of_pairs_stops_early_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        tok = train_bpe(["ab ab ab"], vocab_size=300, special_tokens=[], progress=False)
    assert "ran out of pairs" in caplog.text
    assert len(tok.merges) == 2  # "ab", then " ab"
    assert tok.encode("ab ab") == [256, 257]


def test_custom_pattern_that_skips_text_is_refused():
    tok = train_bpe(["hello world"], vocab_size=270, pattern=r"\w+", special_tokens=[], progress=False)
    with pytest.raises(BinaryLMError, match="skips some characters"):
        tok.encode("hello world")


def test_a_merge_that_rebuilds_an_existing_token_leaves_a_gap(tmp_path, caplog):
    from binarylm.tokenizer import load, save

    # "ab"+"c" and "a"+"bc" both spell "abc": the second id can never be produced.
    merges = [(97, 98), (98, 99), (256, 99), (97, 257)]
    with caplog.at_level(logging.WARNING):
        tok = tokenizer_from_merges(merges, "gpt4", ["<|endoftext|>"])
    assert "rebuilt an existing token" in caplog.text
    assert tok.merges == merges[:3] and 259 not in tok.token_bytes
    assert tok.encode("abc") == [258] and tok.special_tokens == {"<|endoftext|>": 260}
    save(tok, tmp_path / "t.json")
    assert load(tmp_path / "t.json").encode("abc xbc") == tok.encode("abc xbc")
