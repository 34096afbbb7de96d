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
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        ids += [start, *tokenizer.encode_ordinary(f"{message['role']}\n{message['content']}"), end]
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
