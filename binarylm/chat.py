"""`binarylm chat`: a conversation with a checkpoint in the terminal, each reply streamed as it is generated.

    $ binarylm chat --checkpoint runs/sft --system "You are terse."
    you> What is 17 + 25?
    assistant> 42
    you> /reset
    [conversation reset]

Every user line joins the conversation; the whole conversation (system prompt first) is
rendered with the chat template (data/chat.py) and the model continues it after
"<|im_start|>assistant\\n" until it produces the end-of-turn token <|im_end|> (or
<|endoftext|>, or its token budget runs out). Text is written as soon as it is whole: a
token may end in the middle of a UTF-8 character, so bytes are decoded incrementally
(infer/generate.py's TextStream), never one token at a time.

The model's context is finite. Before each reply the oldest exchanges (a user turn and the
replies after it) are dropped, never the system prompt nor the new message, until the
rendered prompt leaves room for the reply: `max_new_tokens`, or half the context if that
is less. Commands: /reset forgets the conversation (the system prompt stays), /exit (or
/quit, or Ctrl-D) ends the session; Ctrl-C stops a reply that is being written.

`chat_session` takes the input and output streams, so a session can be scripted with
io.StringIO; `chat` is the command-line verb and `add_chat_parser` its argparse parser.
Heavy imports (torch, the model) wait until a session starts, so building the CLI's
parser stays quick.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from binarylm.errors import BinaryLMError

if TYPE_CHECKING:
    import torch

    from binarylm.data.chat import RenderedChat
    from binarylm.model import Transformer
    from binarylm.tokenizer import Tokenizer

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
USER_PROMPT = "you> "
REPLY_PREFIX = "assistant> "


@dataclass
class ChatSettings:
    """How the model replies. temperature 0 is greedy; top_k 0 and top_p 1 keep every token."""

    system: str = ""  # the system prompt; empty: none
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    max_new_tokens: int = 256  # the longest reply, in tokens
    seed: int | None = None  # one seeded generator for the whole session; None: PyTorch's global random state
    device: str = "cpu"

    def validate(self) -> ChatSettings:
        from binarylm.infer.sampling import check_sampling_args

        check_sampling_args(self.temperature, self.top_k, self.top_p)
        if self.max_new_tokens < 1:
            raise BinaryLMError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        return self


@dataclass
class ChatTranscript:
    """What a session did: every reply in order, the conversation as it ended, and exchanges dropped to fit."""

    replies: list[str] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    dropped_exchanges: int = 0


# --------------------------------------------------------------------------------------------------------------
# The conversation and fitting it into the context
# --------------------------------------------------------------------------------------------------------------


def fit_to_context(messages: list[dict], tokenizer: Tokenizer, context_length: int,
                   reply_room: int) -> tuple[list[dict], RenderedChat, int]:
    """(kept messages, their rendered prompt, exchanges dropped): the prompt leaves `reply_room` tokens free.

    The oldest exchange goes first; the system prompt and the last user message always stay.
    A prompt that does not fit even then is returned as it is: the caller decides (see `ChatSession`).
    """
    from binarylm.data.chat import render_chat

    kept = list(messages)
    dropped = 0
    rendered = render_chat(kept, tokenizer)
    while len(rendered.prompt_ids) + reply_room > context_length and _drop_oldest_exchange(kept):
        dropped += 1
        rendered = render_chat(kept, tokenizer)
    return kept, rendered, dropped


def _drop_oldest_exchange(messages: list[dict]) -> bool:
    """Remove the first user turn and what follows it up to the next user turn; False if that would be the last."""
    users = [index for index, message in enumerate(messages) if message["role"] == "user"]
    if len(users) < 2:
        return False
    del messages[users[0]: users[1]]
    return True


# --------------------------------------------------------------------------------------------------------------
# A session
# --------------------------------------------------------------------------------------------------------------


class ChatSession:
    """A model, its tokenizer and a conversation, talking through a pair of text streams."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, settings: ChatSettings, output: TextIO):
        self.model, self.tokenizer, self.settings, self.output = model, tokenizer, settings, output
        self.system = [{"role": "system", "content": settings.system}] if settings.system else []
        self.messages: list[dict] = list(self.system)
        self.transcript = ChatTranscript()
        self.generator = _seeded_generator(model, settings.seed)

    # ---------------------------------------------------------------- the loop

    def run(self, input_stream: TextIO) -> ChatTranscript:
        """Answer lines from `input_stream` until /exit, end of input or Ctrl-C at the prompt."""
        interactive = _is_terminal(input_stream) and _is_terminal(self.output)
        while True:
            line = _read_line(input_stream, self.output, interactive)
            if line is None or not self.handle(line):
                break
        if interactive:
            self.output.write("\n")
        self.transcript.messages = list(self.messages)
        return self.transcript

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if text in EXIT_COMMANDS:
            return False
        if text == RESET_COMMAND:
            self.messages = list(self.system)
            self.notice("conversation reset")
        elif text.startswith("/") and " " not in text:
            self.notice(f"unknown command {text}; the commands are {RESET_COMMAND}, {' and '.join(EXIT_COMMANDS)}")
        else:
            self.answer(text)
        return True

    def notice(self, text: str) -> None:
        self.output.write(f"[{text}]\n")
        self.output.flush()

    # ---------------------------------------------------------------- one reply

    def answer(self, user_text: str) -> None:
        """Add the user's message, fit the conversation into the context, and stream the reply."""
        context = self.model.config.context_length
        reply_room = min(self.settings.max_new_tokens, context // 2)
        candidate = [*self.messages, {"role": "user", "content": user_text}]
        kept, rendered, dropped = fit_to_context(candidate, self.tokenizer, context, reply_room)
        budget = min(self.settings.max_new_tokens, context - len(rendered.prompt_ids))
        if budget < 1:
            self.notice(f"that message is too long for the model's context of {context} tokens "
                        f"({len(rendered.prompt_ids)} with the system prompt); it was not sent")
            return
        if dropped:
            self.transcript.dropped_exchanges += dropped
            exchanges = "exchange" if dropped == 1 else "exchanges"
            self.notice(f"dropped the oldest {dropped} {exchanges} to fit the {context}-token context")
        self.output.write(REPLY_PREFIX)
        try:
            reply = self.stream_reply(rendered, budget)
        except KeyboardInterrupt:
            self.output.write("\n")
            self.notice("reply interrupted; it is not kept")
            return
        self.output.write("\n")
        self.output.flush()
        self.messages = [*kept, {"role": "assistant", "content": reply}]
        self.transcript.replies.append(reply)

    def stream_reply(self, rendered: RenderedChat, budget: int) -> str:
        """Generate up to `budget` tokens after the prompt, writing text as it becomes whole; return the reply."""
        from contextlib import closing

        from binarylm.infer.generate import TextStream, generate_ids

        stops = set(rendered.stop_token_ids)
        if self.tokenizer.eot_id is not None:
            stops.add(self.tokenizer.eot_id)
        settings = self.settings
        steps = generate_ids(self.model, rendered.prompt_ids, budget, temperature=settings.temperature,
                             top_k=settings.top_k, top_p=settings.top_p, generator=self.generator, stop_ids=stops)
        stream = TextStream(rendered.stop)  # stop strings: the plain template's "\nUser:"
        writer = _LeadingSpaceTrimmer(self.output)
        with closing(steps):
            for token in steps:
                if token in stops:
                    break
                writer.write(stream.push(self.tokenizer.decode_bytes([token])))
                if stream.stopped:
                    break
        writer.write(stream.finish())
        return stream.text.strip()


class _LeadingSpaceTrimmer:
    """Writes text to a stream, flushed, leaving out the whitespace before the first visible character."""

    def __init__(self, output: TextIO):
        self.output, self.started = output, False

    def write(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.output.write(text)
            self.output.flush()


def _read_line(input_stream: TextIO, output: TextIO, interactive: bool) -> str | None:
    """The next line, or None at end of input (Ctrl-D) or Ctrl-C. A terminal gets a prompt and line editing."""
    try:
        if interactive and input_stream is sys.stdin and output is sys.stdout:
            try:
                import readline  # noqa: F401  (arrow keys and history for input())
            except ImportError:
                pass
            return input(USER_PROMPT)
        if interactive:
            output.write(USER_PROMPT)
            output.flush()
        line = input_stream.readline()
    except (EOFError, KeyboardInterrupt):
        return None
    return line if line else None


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _seeded_generator(model: Transformer, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    import torch

    return torch.Generator(device=model.device).manual_seed(seed)


def chat_session(checkpoint_path: str, input_stream: TextIO, output_stream: TextIO,
                 settings: ChatSettings | None = None) -> ChatTranscript:
    """Load a checkpoint and chat with it: user lines from `input_stream`, replies streamed to `output_stream`."""
    from binarylm.checkpoint import load_checkpoint
    from binarylm.tokenizer import IM_END, IM_START

    settings = (settings or ChatSettings()).validate()
    saved = load_checkpoint(checkpoint_path, device=settings.device)
    context = saved.model.config.context_length
    output_stream.write(f"[chatting with {saved.path} ({context}-token context); {RESET_COMMAND} starts over, "
                        f"{EXIT_COMMANDS[0]} or Ctrl-D quits]\n")
    if not {IM_START, IM_END} <= saved.tokenizer.special_tokens.keys():
        output_stream.write("[this tokenizer has no chat tokens: using the plain 'User: / Assistant:' format]\n")
    return ChatSession(saved.model, saved.tokenizer, settings, output_stream).run(input_stream)


# --------------------------------------------------------------------------------------------------------------
# The command-line verb
# --------------------------------------------------------------------------------------------------------------


def chat(args: argparse.Namespace) -> None:
    """`binarylm chat`: a session on the terminal's stdin and stdout."""
    settings = ChatSettings(system=args.system, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device)
    chat_session(args.checkpoint, sys.stdin, sys.stdout, settings)


def add_chat_parser(verbs) -> argparse.ArgumentParser:
    """Add the `chat` verb to the CLI's subparsers; returns its parser."""
    defaults = ChatSettings()
    parser = verbs.add_parser(
        "chat", help="talk to a chat-tuned checkpoint in the terminal, replies streaming",
        epilog=f"In the session: {RESET_COMMAND} forgets the conversation, {EXIT_COMMANDS[0]} or Ctrl-D quits, "
               "Ctrl-C stops a reply. The oldest exchanges are dropped when the conversation outgrows the context.")
    parser.add_argument("--checkpoint", "-c", required=True, help="a run directory or one of its ckpt-* folders")
    parser.add_argument("--system", default=defaults.system, help="a system prompt for the whole conversation")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="sample among the k likeliest (0: all)")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="sample within this probability mass")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="the longest reply")
    parser.add_argument("--seed", type=int, default=None, help="make the session's sampling reproducible")
    parser.add_argument("--device", default=defaults.device)
    parser.set_defaults(run=chat, command_parser=parser)
    return parser
