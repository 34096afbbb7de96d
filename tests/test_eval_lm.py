"""Language-modelling metrics: sliding-window scoring and bits per byte, which must not depend on the tokenizer.

The tokenizer-independence test uses a text whose every probability is known: words " a" and
" b" drawn independently with probabilities P_A and 1 - P_A. Under a byte-level tokenizer each
word is two tokens (" " is certain, then the letter); under a tokenizer that merged " a" and
" b" each word is one token. Both models below give the text exactly the same probability,
so bits per byte must agree exactly, and equal the source's entropy per byte, while loss per
token differs by the factor of two in token counts.
"""

import math
import random

import pytest
import torch

from binarylm.checkpoint import load_checkpoint
from binarylm.eval.lm import text_metrics
from binarylm.eval.scoring import rolling_logprobs, split_pair
from binarylm.tokenizer.train import train_bpe

P_A = 0.8
CERTAIN = 1e4  # a logit gap after which the other tokens' probability is below float precision


class TableModel(torch.nn.Module):
    """A "language model" whose next-token logits depend on the previous token only: logits = table[previous]."""

    def __init__(self, table: torch.Tensor, context_length: int = 16):
        super().__init__()
        self.table = torch.nn.Parameter(table)  # (V, V)
        self.config = type("Config", (), {"context_length": context_length})()

    def forward(self, ids: torch.Tensor, return_logits: bool = False):
        return self.table[ids], None  # (B, T, V)


def words_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(" a" if rng.random() < P_A else " b" for _ in range(n_words))


def byte_model(tokenizer) -> TableModel:
    """Byte tokens: after a letter (or at the start) a space is certain; after a space, a or b."""
    space, a, b = (tokenizer.encode_ordinary(c)[0] for c in " ab")
    table = torch.full((tokenizer.vocab_size, tokenizer.vocab_size), -CERTAIN)
    table[:, space] = 0.0
    table[space] = -CERTAIN
    table[space, a], table[space, b] = math.log(P_A), math.log(1 - P_A)
    return TableModel(table)


def word_model(tokenizer) -> TableModel:
    """Word tokens: every token is " a" or " b", whatever came before."""
    word_a, word_b = tokenizer.encode_ordinary(" a")[0], tokenizer.encode_ordinary(" b")[0]
    table = torch.full((tokenizer.vocab_size, tokenizer.vocab_size), -CERTAIN)
    table[:, word_a], table[:, word_b] = math.log(P_A), math.log(1 - P_A)
    return TableModel(table)


def test_bits_per_byte_is_the_same_under_two_tokenizations_of_the_same_model():
    text = words_text(600)
    corpus = [words_text(2000, seed=1)]
    bytes_tokenizer = train_bpe(corpus, vocab_size=256 + 4, progress=False)  # the 256 bytes, specials
    words_tokenizer = train_bpe(corpus, vocab_size=256 + 4 + 2, progress=False)  # plus " a" and " b"
    assert len(bytes_tokenizer.encode_ordinary(text)) == 2 * len(words_tokenizer.encode_ordinary(text)) == 1200

    per_bytes = text_metrics(byte_model(bytes_tokenizer), bytes_tokenizer, text)
    per_words = text_metrics(word_model(words_tokenizer), words_tokenizer, text)

    observed_a = text.count(" a")
    entropy_per_byte = -(observed_a * math.log2(P_A) + (600 - observed_a) * math.log2(1 - P_A)) / len(text)
    assert per_bytes["bits_per_byte"] == pytest.approx(entropy_per_byte, rel=1e-6)
    assert per_words["bits_per_byte"] == pytest.approx(entropy_per_byte, rel=1e-6)
    assert per_words["loss"] == pytest.approx(2 * per_bytes["loss"], rel=1e-6)  # per token: not comparable
    assert per_bytes["bytes"] == per_words["bytes"] == len(text)
    assert per_bytes["xz_bits_per_byte"] == per_words["xz_bits_per_byte"] > entropy_per_byte  # the byte baseline


@pytest.mark.parametrize("stride", [1, 5, 16])
def test_a_sliding_window_scores_every_token_once_whatever_the_stride(stride):
    tokenizer = train_bpe([words_text(2000, seed=1)], vocab_size=256 + 4, progress=False)
    model = byte_model(tokenizer)  # context 16, and the text is far longer
    ids = tokenizer.encode_ordinary(words_text(50))
    logprobs = rolling_logprobs(model, ids, tokenizer.eot_id, stride=stride)
    by_hand = [model.table[previous, token].item() for previous, token in zip([tokenizer.eot_id, *ids], ids)]
    assert logprobs.tolist() == pytest.approx(by_hand, abs=1e-5)


def test_sliding_windows_keep_history_and_match_a_full_pass_inside_one_window(base):
    saved = load_checkpoint(base)
    model, tokenizer = saved.model.eval(), saved.tokenizer
    window = model.config.context_length
    ids = tokenizer.encode_ordinary("def add(a, b):\n    return a + b\n" * 40)[: 3 * window]
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([[tokenizer.eot_id, *ids[: window - 1]]]))[0][0], -1)
    direct = first.gather(1, torch.tensor(ids[:window])[:, None]).squeeze(1)  # (window,)
    rolled = rolling_logprobs(model, ids, tokenizer.eot_id, stride=window // 4)
    assert rolled.shape == (len(ids),)
    assert torch.allclose(rolled[:window], direct, atol=1e-5)  # the first window is one plain pass
    assert rolling_logprobs(model, ids, tokenizer.eot_id, stride=window).shape == (len(ids),)


def test_pairs_split_at_the_context_with_its_trailing_space_moved_on(small_tokenizer):
    context, continuation = split_pair(small_tokenizer, "x = ", "value")
    assert small_tokenizer.decode(context) == "x =" and small_tokenizer.decode(continuation) == " value"


def test_text_metrics_explain_an_empty_text(base):
    saved = load_checkpoint(base)
    with pytest.raises(Exception, match="empty"):
        text_metrics(saved.model, saved.tokenizer, "")


def test_pairs_score_without_an_end_of_text_token_as_long_as_every_context_has_text(base, small_tokenizer):
    from binarylm.eval.scoring import score_pairs
    from binarylm.tokenizer import Tokenizer

    model = load_checkpoint(base).model
    plain = Tokenizer(small_tokenizer.ranks, pattern=small_tokenizer.pattern, special_tokens={})
    assert plain.eot_id is None
    [score] = score_pairs(model, plain, [("def f(x):", " return x")])
    assert score == score_pairs(model, small_tokenizer, [("def f(x):", " return x")])[0]
    with pytest.raises(Exception, match="no end-of-text token"):
        score_pairs(model, plain, [("", "return x")])
