"""Chat formatting: a conversation of messages rendered as the token ids a model continues.

BinaryLM tokenizers carry ChatML-style special tokens, so a conversation is

    <|im_start|>system\\nYou are terse.<|im_end|>\\n
    <|im_start|>user\\nHi!<|im_end|>\\n
    <|im_start|>assistant\\n                      <- generation starts here

and the assistant's turn ends when the model produces <|im_end|>. The special
tokens are inserted as ids, never parsed from message text, so a user cannot
forge a turn by typing "<|im_start|>". A tokenizer without those tokens (a
tiktoken file, say) gets a plain-text fallback ("User: ...\\nAssistant:") that
stops at the next "\\nUser:".

For training, `render_for_training` renders the same token stream with a mask of
the tokens the model learns to produce (assistant replies and their <|im_end|>),
`to_example` shifts it into inputs and targets (-100 where not trained), and
`pack_examples` with `document_attention_mask` packs several examples per row.
`read_conversations` reads OpenAI `messages` JSONL, ShareGPT and Alpaca files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from binarylm.data.records import json_records
from binarylm.errors import BinaryLMError
from binarylm.tokenizer import IM_END, IM_START, Tokenizer

ROLES = ("system", "user", "assistant")


@dataclass
class RenderedChat:
    prompt_ids: list[int]
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)


def render_chat(messages: list[dict], tokenizer: Tokenizer, add_generation_prompt: bool = True) -> RenderedChat:
    """Token ids for `messages` ([{"role": ..., "content": ...}, ...]), ready for the assistant's next turn."""
    _check_messages(messages)
    specials = tokenizer.special_tokens
    if IM_START in specials and IM_END in specials:
        return _chatml(messages, tokenizer, specials[IM_START], specials[IM_END], add_generation_prompt)
    return _plain(messages, tokenizer, add_generation_prompt)


def _chatml(messages: list[dict], tokenizer: Tokenizer, start: int, end: int, generate: bool) -> RenderedChat:
    ids: list[int] = []
    for message in messages:
        ids += [start, *_turn_ids(message, tokenizer), end]
        ids += tokenizer.encode_ordinary("\n")
    if generate:
        ids += [start, *tokenizer.encode_ordinary("assistant\n")]
    return RenderedChat(ids, stop_token_ids=[end])


def _plain(messages: list[dict], tokenizer: Tokenizer, generate: bool) -> RenderedChat:
    text = "".join(f"{message['role'].capitalize()}: {message['content']}\n" for message in messages)
    if generate:
        text += "Assistant:"
    return RenderedChat(tokenizer.encode_ordinary(text), stop=["\nUser:", "\nSystem:"])


def _check_messages(messages: list[dict]) -> None:
    if not messages:
        raise BinaryLMError("messages is empty; give at least one {'role': 'user', 'content': ...}")
    for number, message in enumerate(messages):
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise BinaryLMError(
                f"messages[{number}] must have a role in {', '.join(ROLES)} and a text content, got {message!r}"
            )


# --------------------------------------------------------------------------------------------------------------
# Rendering for training: the same token stream, plus which tokens the model learns to produce
# --------------------------------------------------------------------------------------------------------------

TRAIN_ON = ("assistant", "all", "last")
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


class TrainingTokens(NamedTuple):
    """A rendered conversation: `ids`, and `mask[i]` True where ids[i] is a token the model is trained to produce."""

    ids: list[int]
    mask: list[bool]


class Segment(NamedTuple):
    """A run of token ids; `reply` numbers the assistant reply it belongs to (None: not a reply)."""

    ids: list[int]
    reply: int | None


def render_for_training(messages: list[dict], tokenizer: Tokenizer, train_on: str = "assistant") -> TrainingTokens:
    """Token ids of a whole conversation and a same-length mask of the tokens to train on.

    `mask[i]` is True where `ids[i]` is a token the model should learn to *produce*; the
    mask is not shifted (see `to_example` for the inputs/targets a loss wants). `train_on`:

    * "assistant": every assistant reply: its content and its end-of-turn token
      (<|im_end|>), never the "<|im_start|>assistant\\n" header before it;
    * "last": only the last assistant reply;
    * "all": every token.

    With ChatML tokens the ids equal `render_chat(messages, add_generation_prompt=False)`,
    so for an assistant message k the generation prompt `render_chat(messages[:k]).prompt_ids`
    is a prefix of them and the masked reply is what the model is asked to continue with.

    The plain fallback renders "User: ...\\nAssistant: reply" and trains on " reply"
    followed by <|endoftext|> when the tokenizer has one. Its prompt before the first reply
    equals `render_chat`'s; later prompts differ by those end tokens, which `render_chat`'s
    plain history does not carry.
    """
    _check_messages(messages)
    if train_on not in TRAIN_ON:
        raise BinaryLMError(f"train_on={train_on!r} is not one of {', '.join(TRAIN_ON)}")
    if train_on != "all" and not any(message["role"] == "assistant" for message in messages):
        raise BinaryLMError(
            f"the conversation has no assistant turn, so train_on={train_on!r} has nothing to train on; "
            "add an assistant reply or use train_on='all'"
        )
    specials = tokenizer.special_tokens
    if IM_START in specials and IM_END in specials:
        segments = _chatml_segments(messages, tokenizer, specials[IM_START], specials[IM_END])
    else:
        segments = _plain_segments(messages, tokenizer)
    return _mask_segments(segments, train_on)


def _chatml_segments(messages: list[dict], tokenizer: Tokenizer, start: int, end: int) -> list[Segment]:
    """ChatML turns as segments, token for token as `_chatml` renders them."""
    newline = tokenizer.encode_ordinary("\n")
    header = [start, *tokenizer.encode_ordinary("assistant\n")]
    segments: list[Segment] = []
    replies = 0
    for message in messages:
        if message["role"] == "assistant":
            segments.append(Segment(header, None))
            segments.append(Segment([*tokenizer.encode_ordinary(message["content"]), end], replies))
            replies += 1
        else:
            segments.append(Segment([start, *_turn_ids(message, tokenizer), end], None))
        segments.append(Segment(newline, None))
    return segments


def _turn_ids(message: dict, tokenizer: Tokenizer) -> list[int]:
    """A turn's role header and its text, encoded apart: the text's tokens are those the model produces after
    "<|im_start|>assistant\\n", whatever the text starts with."""
    return [*tokenizer.encode_ordinary(f"{message['role']}\n"), *tokenizer.encode_ordinary(message["content"])]


def _plain_segments(messages: list[dict], tokenizer: Tokenizer) -> list[Segment]:
    """The "User: ...\\nAssistant: ..." fallback; each reply ends with <|endoftext|> when there is one."""
    end = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
    segments: list[Segment] = []
    pending = ""  # text before the next reply, encoded in one piece as render_chat does
    replies = 0
    for message in messages:
        if message["role"] == "assistant":
            segments.append(Segment(tokenizer.encode_ordinary(pending + "Assistant:"), None))
            segments.append(Segment([*tokenizer.encode_ordinary(" " + message["content"]), *end], replies))
            replies += 1
            pending = "\n"
        else:
            pending += f"{message['role'].capitalize()}: {message['content']}\n"
    if pending:
        segments.append(Segment(tokenizer.encode_ordinary(pending), None))
    return segments


def _mask_segments(segments: list[Segment], train_on: str) -> TrainingTokens:
    """Join the segments' ids and mark the ones `train_on` selects."""
    last_reply = max((segment.reply for segment in segments if segment.reply is not None), default=None)
    ids: list[int] = []
    mask: list[bool] = []
    for segment in segments:
        if train_on == "all":
            trained = True
        elif train_on == "last":
            trained = segment.reply is not None and segment.reply == last_reply
        else:
            trained = segment.reply is not None
        ids += segment.ids
        mask += [trained] * len(segment.ids)
    return TrainingTokens(ids, mask)


def to_example(ids: list[int], mask: list[bool], max_len: int | None = None) -> tuple[list[int], list[int]]:
    """Shift a rendered conversation into (inputs, targets) for next-token cross-entropy.

    `inputs = ids[:-1]` and `targets[i] = ids[i + 1]`, the token to predict at position i,
    or IGNORE_INDEX (-100) where `mask[i + 1]` is False. With `max_len`, both are cut to
    at most `max_len` positions (the conversation's tail is dropped).
    """
    if len(ids) != len(mask):
        raise BinaryLMError(f"ids and mask differ in length ({len(ids)} and {len(mask)}); render them together")
    if max_len is not None:
        if max_len < 1:
            raise BinaryLMError(f"max_len must be at least 1, got {max_len}")
        ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    if len(ids) < 2:
        raise BinaryLMError("a training example needs at least two tokens (an input and a target)")
    targets = [token if trained else IGNORE_INDEX for token, trained in zip(ids[1:], mask[1:])]
    return ids[:-1], targets


def pad_examples(examples: list[tuple[list[int], list[int]]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (inputs, targets) pairs into tensors (N, T), T the longest; padded targets are IGNORE_INDEX."""
    if not examples:
        raise BinaryLMError("no examples to batch; give at least one (inputs, targets) pair")
    length = max(len(inputs) for inputs, _ in examples)
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (N, T)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (N, T)
    for row, (example_inputs, example_targets) in enumerate(examples):
        inputs[row, : len(example_inputs)] = torch.tensor(example_inputs, dtype=torch.long)
        targets[row, : len(example_targets)] = torch.tensor(example_targets, dtype=torch.long)
    return inputs, targets


# --------------------------------------------------------------------------------------------------------------
# Sequence packing: several examples per row, kept apart by a document id per position
# --------------------------------------------------------------------------------------------------------------

PADDING_DOCUMENT = -1  # the document id of padding positions


class PackedBatch(NamedTuple):
    inputs: torch.Tensor  # (N, T) token ids
    targets: torch.Tensor  # (N, T) next-token targets, IGNORE_INDEX where not trained or padding
    document_ids: torch.Tensor  # (N, T) 0, 1, ... per example within its row; PADDING_DOCUMENT for padding


def pack_examples(examples: list[tuple[list[int], list[int]]], max_len: int, pad_id: int = 0) -> PackedBatch:
    """Pack (inputs, targets) pairs, in order, into rows of exactly `max_len` positions.

    An example goes whole into the current row if it fits, else it starts a new row; an
    example longer than `max_len` is cut to `max_len`. The rest of a row is padding.
    Use `document_attention_mask(document_ids)` so no position attends across examples.
    """
    if max_len < 1:
        raise BinaryLMError(f"max_len must be at least 1, got {max_len}")
    if not examples:
        raise BinaryLMError("no examples to pack; give at least one (inputs, targets) pair")
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    for inputs, targets in examples:
        inputs, targets = inputs[:max_len], targets[:max_len]
        if used + len(inputs) > max_len:
            rows.append([])
            used = 0
        rows[-1].append((inputs, targets))
        used += len(inputs)
    return _pad_rows(rows, max_len, pad_id)


def _pad_rows(rows: list[list[tuple[list[int], list[int]]]], max_len: int, pad_id: int) -> PackedBatch:
    """Lay the packed rows into (N, max_len) tensors."""
    shape = (len(rows), max_len)
    inputs = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    document_ids = torch.full(shape, PADDING_DOCUMENT, dtype=torch.long)
    for row, packed in enumerate(rows):
        position = 0
        for document, (example_inputs, example_targets) in enumerate(packed):
            span = slice(position, position + len(example_inputs))
            inputs[row, span] = torch.tensor(example_inputs, dtype=torch.long)
            targets[row, span] = torch.tensor(example_targets, dtype=torch.long)
            document_ids[row, span] = document
            position = span.stop
    return PackedBatch(inputs, targets, document_ids)


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (N, 1, T, T) from document ids (N, T): True where query i may attend to key j.

    That is j <= i (causal) and both positions in the same document (block-diagonal), the
    convention of `torch.nn.functional.scaled_dot_product_attention`'s boolean `attn_mask`.
    Padding positions form their own document, so every query attends to at least itself.
    """
    length = document_ids.shape[-1]
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (N, T, T)
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()  # (T, T)
    return (same_document & causal)[:, None, :, :]  # (N, 1, T, T)


# --------------------------------------------------------------------------------------------------------------
# Reading chat datasets: OpenAI messages, ShareGPT and Alpaca, detected per file
# --------------------------------------------------------------------------------------------------------------

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS_HELP = (
    "expected OpenAI {'messages': [{'role': ..., 'content': ...}]}, "
    "ShareGPT {'conversations': [{'from': 'human'|'gpt'|'system', 'value': ...}]} "
    "or Alpaca {'instruction': ..., 'input': ..., 'output': ...}"
)


def read_conversations(path: str | os.PathLike) -> list[list[dict]]:
    """Read a chat dataset into conversations, each a list of {"role", "content"} messages.

    The file is either JSONL (one record per line) or one JSON list of records; the record
    format (OpenAI `messages`, ShareGPT `conversations`, or Alpaca `instruction`/`input`/
    `output`) is detected from the first record and must hold for the whole file. Every
    conversation must contain an assistant turn. Problems are reported with the file and
    line (JSONL) or item number (JSON list).
    """
    path = Path(path)
    records = json_records(path, "chat")
    if not records:
        raise BinaryLMError(
            f"{path} holds no conversations; give one JSON record per line (JSONL) or a JSON list of records"
        )
    file_format = _record_format(records[0][1], records[0][0])
    conversations = []
    for where, record in records:
        record_format = _record_format(record, where)
        if record_format != file_format:
            raise BinaryLMError(
                f"{where}: this record is {record_format} but the file started as {file_format}; "
                "use one format per file"
            )
        conversation = READERS[file_format](record, where)
        _check_conversation(conversation, where)
        conversations.append(conversation)
    return conversations


def _record_format(record: dict, where: str) -> str:
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    raise BinaryLMError(f"{where}: unknown record with keys {sorted(record)}; {FORMATS_HELP}")


def _openai_conversation(record: dict, where: str) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise BinaryLMError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}}")
    conversation = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BinaryLMError(f"{where}: messages[{number}] must be an object with 'role' and 'content'")
        conversation.append({"role": message.get("role"), "content": _text_content(message.get("content"))})
    return conversation


def _text_content(content: object) -> object:
    """OpenAI content: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text" for part in content):
        return "".join(str(part.get("text", "")) for part in content)
    return content


def _sharegpt_conversation(record: dict, where: str) -> list[dict]:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise BinaryLMError(f"{where}: 'conversations' must be a list of {{'from': ..., 'value': ...}}")
    conversation = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for number, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise BinaryLMError(
                f"{where}: conversations[{number}] has 'from': {speaker!r}; "
                f"use one of {', '.join(SHAREGPT_ROLES)}"
            )
        conversation.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return conversation


def _alpaca_conversation(record: dict, where: str) -> list[dict]:
    instruction, extra, output = record.get("instruction"), record.get("input", ""), record.get("output")
    if not all(isinstance(text, str) for text in (instruction, extra or "", output)):
        raise BinaryLMError(f"{where}: an Alpaca record needs text 'instruction' and 'output' (and optional 'input')")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


READERS = {"openai": _openai_conversation, "sharegpt": _sharegpt_conversation, "alpaca": _alpaca_conversation}


def _check_conversation(conversation: list[dict], where: str) -> None:
    """Roles, text contents and an assistant turn, with the record's place in the message."""
    if not conversation:
        raise BinaryLMError(f"{where}: the conversation is empty; give at least a user and an assistant turn")
    for number, message in enumerate(conversation):
        if message["role"] not in ROLES:
            raise BinaryLMError(
                f"{where}: message {number} has the unknown role {message['role']!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise BinaryLMError(f"{where}: message {number} ({message['role']}) has no text content")
    if not any(message["role"] == "assistant" for message in conversation):
        raise BinaryLMError(
            f"{where}: the conversation has no assistant turn, so there is nothing to learn from it; "
            "add the assistant's reply or remove the record"
        )
