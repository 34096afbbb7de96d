"""Chat data for training: loss masks, shifting, packing with a document mask, and dataset readers."""

import json

import pytest
import torch
import torch.nn.functional as F

from binarylm.data.chat import (
    document_attention_mask,
    pack_examples,
    pad_examples,
    read_conversations,
    render_chat,
    render_for_training,
    to_example,
)
from binarylm.errors import BinaryLMError
from binarylm.tokenizer import ENDOFTEXT, IM_END, IM_START, Tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "What is 6 * 7?"},
    {"role": "assistant", "content": "42"},
]


@pytest.fixture(scope="module")
def byte_chat_tokenizer():
    """One id per byte plus ChatML ids 256 and 257: every id below is countable by hand."""
    return Tokenizer({bytes([i]): i for i in range(256)}, special_tokens={IM_START: 256, IM_END: 257})


def trained_spans(tokenizer, ids, mask) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    spans, current = [], []
    for token, trained in zip(ids + [None], mask + [False]):
        if trained:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans


# ------------------------------------------------------------------------------------------- loss masks


def test_assistant_mask_covers_exactly_the_replies_and_their_end_tokens(small_tokenizer):
    ids, mask = render_for_training(CONVERSATION, small_tokenizer)
    assert len(ids) == len(mask)
    assert trained_spans(small_tokenizer, ids, mask) == ["Hello there<|im_end|>", "42<|im_end|>"]
    assert small_tokenizer.decode(ids) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello there<|im_end|>\n<|im_start|>user\nWhat is 6 * 7?<|im_end|>\n"
        "<|im_start|>assistant\n42<|im_end|>\n"
    )
    assert ids == render_chat(CONVERSATION, small_tokenizer, add_generation_prompt=False).prompt_ids


def test_mask_by_hand_on_a_byte_tokenizer(byte_chat_tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ab"}]
    ids, mask = render_for_training(messages, byte_chat_tokenizer)
    user_turn = [256, *b"user\nq", 257, 10]
    header = [256, *b"assistant\n"]
    assert ids == user_turn + header + [97, 98, 257, 10]
    assert mask == [False] * (len(user_turn) + len(header)) + [True, True, True, False]


def test_train_on_last_and_all(small_tokenizer):
    ids, mask = render_for_training(CONVERSATION, small_tokenizer, train_on="last")
    assert trained_spans(small_tokenizer, ids, mask) == ["42<|im_end|>"]
    all_ids, all_mask = render_for_training(CONVERSATION, small_tokenizer, train_on="all")
    assert all_ids == ids and all(all_mask)


@pytest.mark.parametrize("reply", ["Hello there", "  two spaces", " x\n", "\tindented"])
def test_generation_prompt_is_a_prefix_of_the_training_rendering(small_tokenizer, reply):
    messages = [*CONVERSATION[:2], {"role": "assistant", "content": reply}, *CONVERSATION[3:]]
    ids, mask = render_for_training(messages, small_tokenizer)
    for k in (2, 4):  # the assistant turns
        prompt = render_chat(messages[:k], small_tokenizer).prompt_ids
        assert ids[: len(prompt)] == prompt
        assert not mask[len(prompt) - 1] and mask[len(prompt)]  # training starts right after the prompt
    assert trained_spans(small_tokenizer, ids, mask) == [f"{reply}<|im_end|>", "42<|im_end|>"]


def test_a_reply_starting_with_a_line_break_is_trained_as_generated(small_tokenizer):
    messages = [*CONVERSATION[:2], {"role": "assistant", "content": "\n\nblank lines first"}]
    ids, mask = render_for_training(messages, small_tokenizer)
    prompt = render_chat(messages[:2], small_tokenizer).prompt_ids
    assert ids[: len(prompt)] == prompt and not mask[len(prompt) - 1] and mask[len(prompt)]
    assert trained_spans(small_tokenizer, ids, mask) == ["\n\nblank lines first<|im_end|>"]


def test_plain_fallback_trains_on_the_reply_and_endoftext(ours_cl100k):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, mask = render_for_training(messages, ours_cl100k)
    assert ours_cl100k.decode(ids) == "User: 2+2?\nAssistant: 4<|endoftext|>\n"
    assert trained_spans(ours_cl100k, ids, mask) == [" 4" + ENDOFTEXT]
    prompt = render_chat(messages[:1], ours_cl100k).prompt_ids
    assert ids[: len(prompt)] == prompt and mask[len(prompt)]


def test_plain_fallback_without_endoftext_by_hand():
    byte_tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ids, mask = render_for_training(messages, byte_tokenizer)
    assert ids == list(b"User: q\nAssistant: a\n")
    assert mask == [False] * len(b"User: q\nAssistant:") + [True, True, False]


def test_conversation_without_assistant_and_bad_train_on_are_errors(small_tokenizer):
    user_only = [{"role": "user", "content": "hi"}]
    with pytest.raises(BinaryLMError, match="no assistant turn"):
        render_for_training(user_only, small_tokenizer)
    ids, mask = render_for_training(user_only, small_tokenizer, train_on="all")
    assert all(mask) and len(ids) > 0
    with pytest.raises(BinaryLMError, match="train_on"):
        render_for_training(CONVERSATION, small_tokenizer, train_on="user")


# ------------------------------------------------------------------------------------------- examples


def test_to_example_shifts_and_ignores_untrained_targets():
    inputs, targets = to_example([1, 2, 3, 4, 5], [False, False, True, True, False])
    assert inputs == [1, 2, 3, 4]
    assert targets == [-100, 3, 4, -100]
    assert to_example([1, 2, 3, 4, 5], [False, False, True, True, False], max_len=2) == ([1, 2], [-100, 3])
    with pytest.raises(BinaryLMError, match="length"):
        to_example([1, 2], [True])


def test_pad_examples():
    inputs, targets = pad_examples([([1, 2, 3], [2, 3, 4]), ([5], [-100])], pad_id=0)
    assert inputs.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert targets.tolist() == [[2, 3, 4], [-100, -100, -100]]


# ------------------------------------------------------------------------------------------- packing


def test_pack_examples_fills_rows_in_order():
    examples = [([1, 2, 3], [2, 3, -100]), ([4, 5], [5, 6]), ([7, 8, 9, 10], [8, 9, 10, 11]), (list(range(9)), [1] * 9)]
    inputs, targets, document_ids = pack_examples(examples, max_len=5, pad_id=0)
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [0, 1, 2, 3, 4]]
    assert targets.tolist() == [[2, 3, -100, 5, 6], [8, 9, 10, 11, -100], [1, 1, 1, 1, 1]]
    assert document_ids.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1], [0, 0, 0, 0, 0]]


def test_document_mask_is_causal_and_block_diagonal():
    mask = document_attention_mask(torch.tensor([[0, 0, 1, 1, -1]]))
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ]


def test_packed_attention_equals_attention_on_each_document_alone():
    torch.manual_seed(0)
    packed = pack_examples([([1, 2, 3], [0] * 3), ([4, 5, 6, 7], [0] * 4)], max_len=8)
    query, key, value = torch.randn(3, 1, 2, 8, 4).unbind(0)  # (N, heads, T, head_dim)
    mask = document_attention_mask(packed.document_ids)
    together = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    for span in (slice(0, 3), slice(3, 7)):
        part = (query[..., span, :], key[..., span, :], value[..., span, :])
        alone = F.scaled_dot_product_attention(*part, is_causal=True)
        torch.testing.assert_close(together[..., span, :], alone)
    assert not together.isnan().any()


# ------------------------------------------------------------------------------------------- readers


def write_lines(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def test_reads_openai_messages_jsonl(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_lines(path, [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, {"role": "assistant", "content": "c", "name": "bot"}]}])  # noqa: E501
    assert read_conversations(path) == [
        CONVERSATION,
        [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}],
    ]


def test_reads_sharegpt(tmp_path):
    path = tmp_path / "share.jsonl"
    turns = [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    write_lines(path, [{"conversations": turns}])
    assert read_conversations(path) == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    ]


@pytest.mark.parametrize("as_list", [True, False])
def test_reads_alpaca_json_and_jsonl(tmp_path, as_list):
    records = [
        {"instruction": "Add.", "input": "2 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    path = tmp_path / ("alpaca.json" if as_list else "alpaca.jsonl")
    if as_list:
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    else:
        write_lines(path, records)
    assert read_conversations(path) == [
        [{"role": "user", "content": "Add.\n\n2 3"}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
    ]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps({"messages": CONVERSATION})
    path.write_text(f"{good}\n\n{{'messages': oops\n{good}\n", encoding="utf-8")
    with pytest.raises(BinaryLMError) as error:
        read_conversations(path)
    assert str(path) in str(error.value) and "line 3" in str(error.value)


def test_malformed_json_list_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "x", "output": "y"},\n  {"instruction": }\n]\n', encoding="utf-8")
    with pytest.raises(BinaryLMError, match=r"broken\.json, line 3"):
        read_conversations(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n", "[]"])
def test_empty_dataset_is_an_error(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BinaryLMError, match="no conversations"):
        read_conversations(path)


def test_conversation_without_assistant_is_an_error_with_its_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_lines(path, [{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}])
    with pytest.raises(BinaryLMError, match=r"line 2: the conversation has no assistant turn"):
        read_conversations(path)


@pytest.mark.parametrize(
    ("record", "named"),
    [
        ({"conversations": [{"from": "bot", "value": "x"}]}, "'bot'"),
        ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "'tool'"),
        ({"prompt": "x", "completion": "y"}, "unknown record"),
    ],
)
def test_unknown_roles_and_formats_are_named(tmp_path, record, named):
    path = tmp_path / "data.jsonl"
    write_lines(path, [record])
    with pytest.raises(BinaryLMError, match=named):
        read_conversations(path)


def test_mixed_formats_and_missing_files_are_errors(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_lines(path, [{"messages": CONVERSATION}, {"instruction": "x", "output": "y"}])
    with pytest.raises(BinaryLMError, match="line 2: this record is alpaca but the file started as openai"):
        read_conversations(path)
    with pytest.raises(BinaryLMError, match="not a file"):
        read_conversations(tmp_path / "missing.jsonl")
