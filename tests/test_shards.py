"""Token shards on disk, the window loader, and JSONL inputs."""

import json
import struct

import numpy as np
import pytest
import torch

from binarylm.data.shards import HEADER_SIZE, MAGIC, TokenShards, WindowLoader, prepare_shards
from binarylm.data.sources import read_texts, split_files, text_source
from binarylm.errors import BinaryLMError
from binarylm.tokenizer import train_bpe

DOCS = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(DOCS, vocab_size=300, progress=False)


def expected_ids(tok, docs) -> list[int]:
    ids = []
    for doc in docs:
        ids += tok.encode_ordinary(doc) + [tok.eot_id]
    return ids


@pytest.fixture(scope="module")
def prepared(tok, tmp_path_factory):
    """DOCS prepared in shards of 97 tokens (so there are several)."""
    out = tmp_path_factory.mktemp("shards")
    meta = prepare_shards(tok, DOCS, out, "train", progress=False, shard_tokens=97)
    return out, meta


# ---------------------------------------------------------------- shards


def test_header_round_trip(tok, prepared):
    out, meta = prepared
    raw = (out / "train-00000.bin").read_bytes()
    magic, version, token_bytes, num_tokens, vocab_size = struct.unpack("<8sIIQQ", raw[:HEADER_SIZE])
    assert (magic, version, token_bytes, num_tokens, vocab_size) == (MAGIC, 1, 2, 97, tok.vocab_size)
    assert len(raw) == HEADER_SIZE + 97 * 2
    ids = np.frombuffer(raw[HEADER_SIZE:], dtype="<u2")
    assert ids.tolist() == expected_ids(tok, DOCS)[:97]


def test_slices_across_shard_boundaries_equal_the_concatenated_ids(tok, prepared):
    out, meta = prepared
    shards = TokenShards.open(out, "train")
    ids = expected_ids(tok, DOCS)
    assert len(shards) == len(ids) == meta["num_tokens"]
    assert len(meta["shards"]) == -(-len(ids) // 97) > 2
    assert shards.slice(0, len(ids)).tolist() == ids
    for start, stop in [(90, 100), (96, 97), (97, 98), (50, 250), (len(ids) - 3, len(ids)), (5, 5)]:
        piece = shards.slice(start, stop)
        assert piece.dtype == np.int64 and piece.tolist() == ids[start:stop]
    with pytest.raises(BinaryLMError, match="outside"):
        shards.slice(0, len(ids) + 1)


def test_eot_after_every_document_and_meta_counts(tok, tmp_path):
    docs = ["héllo wörld", "", "second document"]
    meta = prepare_shards(tok, docs, tmp_path, "val", progress=False)
    ids = TokenShards.open(tmp_path, "val").slice(0, meta["num_tokens"]).tolist()
    assert ids == expected_ids(tok, ["héllo wörld", "second document"])  # the empty text is skipped
    assert ids.count(tok.eot_id) == 2 and ids[-1] == tok.eot_id
    assert meta["num_documents"] == 2
    assert meta["num_bytes"] == len("héllo wörld".encode()) + len(b"second document") == 28
    assert meta["vocab_size"] == tok.vocab_size and meta["bytes_per_token"] == 2
    assert meta["shards"] == ["val-00000.bin"]
    assert json.loads((tmp_path / "val.json").read_text()) == meta
    assert not list(tmp_path.glob(".*tmp"))


def test_vocabularies_above_65536_use_four_bytes_per_token(tmp_path):
    class Wide:  # a stand-in tokenizer whose ids need 32 bits
        name, vocab_size, eot_id = "wide", 70_000, 69_999

        def encode_batch(self, texts, **_):
            return [[65_536 + len(text), 7] for text in texts]

    meta = prepare_shards(Wide(), ["abc", "de"], tmp_path, "train", progress=False)
    assert meta["bytes_per_token"] == 4
    raw = (tmp_path / "train-00000.bin").read_bytes()
    assert struct.unpack("<I", raw[12:16]) == (4,) and len(raw) == HEADER_SIZE + 6 * 4
    assert TokenShards.open(tmp_path, "train").slice(0, 6).tolist() == [65_539, 7, 69_999, 65_538, 7, 69_999]


def test_special_token_text_is_encoded_as_plain_text(tok, tmp_path):
    meta = prepare_shards(tok, ["a <|endoftext|> b"], tmp_path, "train", progress=False)
    ids = TokenShards.open(tmp_path, "train").slice(0, meta["num_tokens"]).tolist()
    assert ids.count(tok.eot_id) == 1 and ids[-1] == tok.eot_id


def test_a_shorter_prepare_removes_the_old_extra_shards(tok, tmp_path):
    prepare_shards(tok, DOCS, tmp_path, "train", progress=False, shard_tokens=97)
    meta = prepare_shards(tok, DOCS[:2], tmp_path, "train", progress=False, shard_tokens=97)
    assert sorted(p.name for p in tmp_path.glob("train-*.bin")) == meta["shards"]
    assert len(TokenShards.open(tmp_path, "train")) == len(expected_ids(tok, DOCS[:2]))


def test_empty_corpus_is_an_error(tok, tmp_path):
    with pytest.raises(BinaryLMError, match="no text to tokenize"):
        prepare_shards(tok, ["", ""], tmp_path, "train", progress=False)
    assert not list(tmp_path.iterdir())


def test_missing_shards_say_to_run_prepare(tok, tmp_path):
    with pytest.raises(BinaryLMError, match="run the data prepare step"):
        TokenShards.open(tmp_path, "train")
    prepare_shards(tok, DOCS, tmp_path, "train", progress=False, shard_tokens=97)
    (tmp_path / "train-00001.bin").unlink()
    with pytest.raises(BinaryLMError, match="missing; run the data prepare step"):
        TokenShards.open(tmp_path, "train")


def test_corrupt_shards_say_to_prepare_again(tok, tmp_path):
    prepare_shards(tok, DOCS, tmp_path, "train", progress=False, shard_tokens=97)
    path = tmp_path / "train-00000.bin"
    raw = path.read_bytes()
    path.write_bytes(b"NOTMAGIC" + raw[8:])
    with pytest.raises(BinaryLMError, match="corrupt shard .*magic.*prepare again"):
        TokenShards.open(tmp_path, "train")
    path.write_bytes(raw[:-2])  # truncated
    with pytest.raises(BinaryLMError, match="corrupt shard .*promises 97 tokens"):
        TokenShards.open(tmp_path, "train")
    path.write_bytes(raw[:8] + struct.pack("<I", 9) + raw[12:])
    with pytest.raises(BinaryLMError, match="corrupt shard .*version 9"):
        TokenShards.open(tmp_path, "train")


# ---------------------------------------------------------------- windows


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A stream whose token at position i is i % 251, in shards of 100, to check windows by value."""
    out = tmp_path_factory.mktemp("stream")
    tokens = np.arange(1000) % 251

    class Identity:  # a stand-in tokenizer: each character's code point is its id
        name, vocab_size, eot_id = "identity", 256, None

        def encode_batch(self, texts, **_):
            return [[ord(c) for c in text] for text in texts]

    prepare_shards(Identity(), ["".join(map(chr, tokens))], out, "train", progress=False, shard_tokens=100)
    return TokenShards.open(out, "train")


def window_ids(x: torch.Tensor) -> list[int]:
    """Window starts of a batch from the stream fixture (the first token is the start mod 251)."""
    return x[:, 0].tolist()


def test_x_and_y_are_windows_shifted_by_one(stream):
    loader = WindowLoader(stream, context_length=16, batch_size=4, seed=3)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        start = int(row_x[0])
        assert row_x.tolist() == [(start + i) % 251 for i in range(16)]
        assert int(row_y[-1]) == (start + 16) % 251


def test_stride_sets_window_starts_and_count(stream):
    T = 16
    assert WindowLoader(stream, T, 1).num_windows == (1000 - T - 1) // T + 1 == 62
    loader = WindowLoader(stream, T, 10, stride=5)
    assert loader.num_windows == (1000 - T - 1) // 5 + 1
    starts = []
    for _ in range(loader.num_windows // 10):
        x, _ = loader.next_batch()
        starts += [s % 251 for s in window_ids(x)]
    expected = {(w * 5) % 251 for w in range(loader.num_windows)}
    assert set(starts) <= expected and len(starts) == loader.num_windows - loader.num_windows % 10
    assert loader.tokens_per_batch == 10 * T


def test_same_seed_same_batches_other_seed_other_batches(stream):
    a, b, c = (WindowLoader(stream, 16, 4, seed=s) for s in (7, 7, 8))
    batches_a = [a.next_batch()[0] for _ in range(5)]
    batches_b = [b.next_batch()[0] for _ in range(5)]
    batches_c = [c.next_batch()[0] for _ in range(5)]
    assert all(torch.equal(p, q) for p, q in zip(batches_a, batches_b))
    assert not all(torch.equal(p, q) for p, q in zip(batches_a, batches_c))


def test_an_epoch_visits_each_window_once_then_reshuffles(stream):
    loader = WindowLoader(stream, 16, 5)  # 62 windows: 12 batches, 2 windows left over
    starts = lambda: [window_ids(loader.next_batch()[0]) for _ in range(12)]
    first = sum(starts(), [])
    assert len(set(first)) == 60 and loader.epoch == 0
    second = sum(starts(), [])
    assert loader.epoch == 1 and first != second


def test_exact_resume_from_state_dict(stream):
    loader = WindowLoader(stream, 16, 4, seed=11)
    for _ in range(20):  # into the second epoch (15 batches per epoch)
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    assert state == {"epoch": 1, "cursor": 20, "seed": 11, "num_windows": 62}
    resumed = WindowLoader(stream, 16, 4, seed=0)
    resumed.load_state_dict(state)
    for _ in range(20):
        (x1, y1), (x2, y2) = loader.next_batch(), resumed.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_resume_with_other_data_is_an_error(stream):
    state = WindowLoader(stream, 16, 4).state_dict()
    with pytest.raises(BinaryLMError, match="data changed since the checkpoint"):
        WindowLoader(stream, 32, 4).load_state_dict(state)
    with pytest.raises(BinaryLMError, match="lacks cursor"):
        WindowLoader(stream, 16, 4).load_state_dict({"epoch": 0, "seed": 0, "num_windows": 62})


def test_two_ranks_see_the_windows_of_one_rank_with_double_batch(stream):
    single = WindowLoader(stream, 16, 6, seed=5)  # 62 windows: 10 global batches per epoch
    ranks = [WindowLoader(stream, 16, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(25):  # crosses two epoch boundaries
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
    assert single.epoch == ranks[0].epoch == ranks[1].epoch == 2
    assert single.tokens_per_batch == ranks[0].tokens_per_batch == 6 * 16


def test_eval_batches_are_deterministic_and_rank_aware(stream):
    single = WindowLoader(stream, 16, 8)
    batches = list(single.eval_batches(batch_size=4, max_batches=100))
    assert len(batches) == 62 // 4
    starts = sum((window_ids(x) for x, _ in batches), [])
    assert starts == [(16 * w) % 251 for w in range(60)]  # in order, non-overlapping
    assert len(list(single.eval_batches(4, max_batches=3))) == 3
    ranks = [WindowLoader(stream, 16, 8, rank=r, world_size=2) for r in range(2)]
    split = [list(loader.eval_batches(batch_size=2, max_batches=100)) for loader in ranks]
    assert len(split[0]) == len(split[1]) == 15
    for (x, _), (x0, _), (x1, _) in zip(batches, *split):
        assert torch.equal(x, torch.cat([x0, x1]))


def test_eval_on_a_small_split_uses_one_smaller_batch(stream):
    small = WindowLoader(stream, 100, 64)  # 9 eval windows, fewer than one training batch
    batches = list(small.eval_batches(batch_size=64, max_batches=10))
    assert len(batches) == 1 and batches[0][0].shape == (9, 100)
    ranks = [WindowLoader(stream, 100, 64, rank=r, world_size=2) for r in range(2)]
    shares = [list(loader.eval_batches(64, 10)) for loader in ranks]
    assert [len(share) for share in shares] == [1, 1] and shares[0][0][0].shape == (4, 100)
    assert torch.equal(torch.cat([shares[0][0][0], shares[1][0][0]]), batches[0][0][:8])
    with pytest.raises(BinaryLMError, match="fewer than one per process"):
        next(WindowLoader(stream, 500, 1, world_size=2).eval_batches(4, 1))


def test_too_few_windows_is_an_error_with_the_numbers(stream):
    loader = WindowLoader(stream, 100, 8, world_size=2)  # fine for eval_batches alone
    with pytest.raises(BinaryLMError, match=r"1000 tokens give 9 windows .* fewer than one batch of 16"):
        loader.next_batch()
    with pytest.raises(BinaryLMError, match="rank 2 is outside"):
        WindowLoader(stream, 16, 1, rank=2, world_size=2)


# ---------------------------------------------------------------- JSONL and splits


def test_jsonl_yields_one_text_per_line_from_the_field(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "first\ndocument", "id": 1}, {"body": "x", "text": "second"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(read_texts([path])) == ["first\ndocument", "second"]
    other = tmp_path / "other.jsonl"
    other.write_text('{"content": "one"}\n{"content": "two"}\n')
    assert list(text_source([other], text_field="content")) == ["one", "two"]


def test_jsonl_bad_line_and_missing_field_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(BinaryLMError, match=r"bad.jsonl line 2 is not valid JSON.*'text' field"):
        list(read_texts([path]))
    path.write_text('{"text": "fine"}\n{"body": "x", "id": 3}\n')
    with pytest.raises(BinaryLMError, match=r"bad.jsonl line 2 has no 'text' field \(its fields: 'body', 'id'\)"):
        list(read_texts([path]))
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(BinaryLMError, match="line 1 holds a JSON list"):
        list(read_texts([path]))


def test_user_files_split_by_path_hash(tmp_path):
    files = []
    for i in range(200):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(f"document {i}")
    train, val = split_files(files, "train", 0.2), split_files(files, "val", 0.2)
    assert sorted(train + val) == sorted(files) and set(train).isdisjoint(val)
    assert 10 < len(val) < 70 and split_files(files, "all", 0.2) == files
    assert list(text_source([tmp_path], split="val", val_fraction=0.2)) == [p.read_text() for p in sorted(val)]


def test_a_single_user_file_stays_in_train_and_val_is_empty(tmp_path):
    path = tmp_path / "only.txt"
    path.write_text("the whole corpus")
    for fraction in (0.0, 0.5, 1.0):  # even when the hash would send it to validation
        assert split_files([path], "train", fraction) == [path]
        assert split_files([path], "val", fraction) == []
    assert list(text_source([path], split="val")) == []
    assert list(text_source([path], split="train")) == ["the whole corpus"]
