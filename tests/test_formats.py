"""Our tokenizer.json, tiktoken rank files and Hugging Face export all give the same ids."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from binarylm.errors import BinaryLMError
from binarylm.tokenizer import (
    load,
    load_tiktoken,
    open_tokenizer,
    save,
    save_hf,
    save_tiktoken,
    train_bpe,
)
from binarylm.tokenizer.formats import byte_to_unicode

SAMPLE = "def f(x):\n    return x ** 2  # héllo 😀 中文\n\n\tdon't 12345 <|endoftext|>"


@pytest.fixture(scope="module")
def hf_tokenizer(small_tokenizer, tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    save_hf(small_tokenizer, path)
    return tokenizers.Tokenizer.from_file(str(path))


@pytest.fixture(scope="module")
def gpt2_pattern_tokenizer(val_texts):
    return train_bpe(val_texts[:8], vocab_size=700, pattern="gpt2", progress=False)


def test_own_format_roundtrips(small_tokenizer, tmp_path, val_texts):
    save(small_tokenizer, tmp_path / "tokenizer.json")
    loaded = load(tmp_path)  # a directory holding tokenizer.json works too
    assert loaded.merges == small_tokenizer.merges
    assert loaded.special_tokens == small_tokenizer.special_tokens
    assert loaded.pattern == small_tokenizer.pattern
    text = "".join(val_texts[:3])
    assert loaded.encode_ordinary(text) == small_tokenizer.encode_ordinary(text)


def test_own_format_is_readable(small_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    save(small_tokenizer, path)
    data = json.loads(path.read_text())
    assert data["pattern_name"] == "gpt4"
    entry = data["vocab"][256]
    assert entry["id"] == 256 and "merge" in entry and isinstance(entry["text"], str)
    assert data["vocab"][ord("a")] == {"id": 97, "text": "a", "byte": 97}
    assert path.read_text().count("\n") > small_tokenizer.vocab_size  # one token per line


def test_cl100k_survives_our_format(ours_cl100k, tmp_path):
    save(ours_cl100k, tmp_path / "cl100k.json")
    loaded = load(tmp_path / "cl100k.json")
    assert loaded.ranks == ours_cl100k.ranks
    assert loaded.encode(SAMPLE, allowed_special="all") == ours_cl100k.encode(SAMPLE, allowed_special="all")


def test_tiktoken_export_reproduces_our_ids(small_tokenizer, tmp_path, val_texts):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    path = tmp_path / "ours.tiktoken"
    save_tiktoken(small_tokenizer, path)
    theirs = tiktoken.Encoding(
        "ours", pat_str=small_tokenizer.pattern, mergeable_ranks=load_tiktoken_bpe(str(path)),
        special_tokens=small_tokenizer.special_tokens,
    )
    text = "".join(val_texts[:5]) + SAMPLE
    assert theirs.encode(text, allowed_special="all") == small_tokenizer.encode(text, allowed_special="all")
    reloaded = load_tiktoken(path, special_tokens=small_tokenizer.special_tokens)
    assert reloaded.encode(text, allowed_special="all") == small_tokenizer.encode(text, allowed_special="all")


def test_hf_export_reproduces_our_ids(small_tokenizer, hf_tokenizer, val_texts):
    text = "".join(val_texts[:5]) + SAMPLE
    assert hf_tokenizer.encode(text).ids == small_tokenizer.encode(text, allowed_special="all")
    ids = small_tokenizer.encode(SAMPLE, allowed_special="all")
    assert hf_tokenizer.decode(ids, skip_special_tokens=False) == SAMPLE


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_hf_export_reproduces_our_ids_on_any_text(small_tokenizer, hf_tokenizer, text):
    assert hf_tokenizer.encode(text).ids == small_tokenizer.encode(text, allowed_special="all")


def test_hf_export_with_gpt2_pattern(gpt2_pattern_tokenizer, tmp_path, val_texts):
    tokenizers = pytest.importorskip("tokenizers")
    save_hf(gpt2_pattern_tokenizer, tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "".join(val_texts[8:10]) + SAMPLE
    assert hf.encode(text).ids == gpt2_pattern_tokenizer.encode(text, allowed_special="all")


def test_byte_to_unicode_is_a_printable_bijection():
    mapping = byte_to_unicode()
    assert len(set(mapping.values())) == 256
    assert mapping[ord("a")] == "a" and mapping[ord(" ")] == "\u0120"
    assert all(c.isprintable() and not c.isspace() for c in mapping.values())


def test_open_tokenizer_knows_names_and_paths(small_tokenizer, tmp_path):
    assert open_tokenizer("cl100k_base").vocab_size == 100277
    save(small_tokenizer, tmp_path / "t.json")
    assert open_tokenizer(tmp_path / "t.json").vocab_size == 1024
    with pytest.raises(BinaryLMError, match="no tokenizer at"):
        open_tokenizer(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something-else"}', "not a BinaryLM tokenizer"),
        ('{"model": {"type": "BPE"}}', "looks like a Hugging Face"),
        ('{"format": "binarylm-tokenizer", "version": 99}', "format version 99"),
        ('{"format": "binarylm-tokenizer", "version": 1, "vocab": [{"id": 0}]}', "corrupt"),
    ],
)
def test_corrupt_tokenizer_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(BinaryLMError, match=message):
        load(path)


def test_tampered_vocab_is_detected(small_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    save(small_tokenizer, path)
    data = json.loads(path.read_text())
    data["vocab"][300]["merge"] = [97, 98]
    path.write_text(json.dumps(data))
    with pytest.raises(BinaryLMError, match="token 300 reads"):
        load(path)
    data["vocab"] = data["vocab"][:200]
    path.write_text(json.dumps(data))
    with pytest.raises(BinaryLMError, match="256 single bytes"):
        load(path)


def test_truncated_file_is_a_clear_error(small_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    save(small_tokenizer, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(BinaryLMError, match="not valid JSON"):
        load(path)


def test_bad_tiktoken_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(BinaryLMError, match="line 2"):
        load_tiktoken(path)
    with pytest.raises(BinaryLMError, match="does not exist"):
        load_tiktoken(tmp_path / "nope.tiktoken")


def test_saving_leaves_no_temporary_files(small_tokenizer, tmp_path):
    save(small_tokenizer, tmp_path / "tokenizer.json")
    save(small_tokenizer, tmp_path / "tokenizer.json")  # overwriting is atomic too
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
