"""The built-in corpus and reading text from the user's files."""

import pytest

from binarylm.data.sources import (
    ReadStats,
    read_texts,
    resolve_inputs,
    stdlib_files,
    stdlib_root,
    text_source,
)
from binarylm.errors import BinaryLMError
from binarylm.tokenizer import train_bpe


def test_stdlib_corpus_is_sorted_and_excludes_tests_and_idlelib():
    files = stdlib_files("all")
    assert files == sorted(files)
    root = stdlib_root()
    parts = {part for f in files for part in f.relative_to(root).parts[:-1]}
    assert not parts & {"test", "idlelib", "site-packages", "pydoc_data"}
    assert sum(f.stat().st_size for f in files) > 8_000_000


def test_stdlib_split_is_deterministic_and_disjoint():
    train, val = stdlib_files("train"), stdlib_files("val")
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == stdlib_files("all")
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.1
    assert stdlib_files("val") == val
    with pytest.raises(BinaryLMError, match="unknown split"):
        stdlib_files("dev")


def test_invalid_utf8_is_replaced_counted_and_reported(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("all fine \ufffd already here\n", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 and \xff\xfe more\n")
    stats = ReadStats()
    texts = list(read_texts([good, bad], stats))
    assert texts[1] == "caf\ufffd and \ufffd\ufffd more\n"
    assert stats.invalid_utf8_files == [str(bad)]
    assert stats.replaced_chars == 3
    assert "invalid UTF-8 in 1 files" in stats.report()
    tok = train_bpe(read_texts([good, bad]), vocab_size=300, progress=False)  # not fatal
    assert tok.decode(tok.encode(texts[1])) == texts[1]


def test_directories_expand_to_their_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert [p.name for p in resolve_inputs([tmp_path])] == ["a.txt", "b.md"]
    assert list(text_source([tmp_path])) == ["alpha", "beta"]


def test_missing_paths_and_empty_directories_are_clear_errors(tmp_path):
    with pytest.raises(BinaryLMError, match="does not exist"):
        resolve_inputs([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BinaryLMError, match="holds no text files"):
        resolve_inputs([tmp_path / "empty"])


def test_big_files_are_read_in_line_aligned_chunks(tmp_path, monkeypatch):
    import binarylm.data.sources as sources

    monkeypatch.setattr(sources, "CHUNK_CHARS", 10)
    path = tmp_path / "big.txt"
    path.write_text("first line here\nsecond\nthird line\n")
    chunks = list(read_texts([path]))
    assert "".join(chunks) == path.read_text()
    assert all(chunk.endswith("\n") for chunk in chunks)
