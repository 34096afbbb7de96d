"""`binarylm chat`: scripted sessions through io.StringIO stream greedy replies, reset, trim history, and exit."""

import argparse
import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from binarylm.chat import (
    REPLY_PREFIX,
    ChatSession,
    ChatSettings,
    add_chat_parser,
    chat,
    chat_session,
    fit_to_context,
)
from binarylm.checkpoint import load_checkpoint, save_checkpoint
from binarylm.config import build_config
from binarylm.data.chat import render_chat
from binarylm.errors import BinaryLMError
from binarylm.infer.generate import generate_ids
from binarylm.model import Transformer
from binarylm.tokenizer import IM_END, train_bpe

GREEDY = dict(temperature=0.0, max_new_tokens=8)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest, and disturb nothing else, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(small_tokenizer, tmp_path_factory):
    """A tiny model with large random weights, so greedy replies vary (and hold broken UTF-8 now and then)."""
    config = build_config({"model": {"preset": "tiny", "vocab_size": small_tokenizer.vocab_size,
                                       "context_length": 128}})
    torch.manual_seed(0)
    model = Transformer(config.model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("chat-base")
    save_checkpoint(path, 0, model, small_tokenizer, config)
    return path


@pytest.fixture(scope="module")
def loaded(base):
    saved = load_checkpoint(base)
    return saved.model, saved.tokenizer


class RecordingOutput(io.StringIO):
    """A StringIO that remembers each write, to see that replies arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []

    def write(self, text: str) -> int:
        self.pieces.append(text)
        return super().write(text)


def greedy_text(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """The reply greedy decoding gives for `messages`, as chat streams it (leading whitespace left out)."""
    rendered = render_chat(messages, tokenizer)
    stops = {*rendered.stop_token_ids, tokenizer.eot_id}
    budget = min(max_new_tokens, model.config.context_length - len(rendered.prompt_ids))
    ids = [token for token in generate_ids(model, rendered.prompt_ids, budget, stop_ids=stops) if token not in stops]
    return tokenizer.decode(ids).lstrip()


def run(base, script: str, **settings) -> tuple[str, object, RecordingOutput]:
    output = RecordingOutput()
    transcript = chat_session(str(base), io.StringIO(script), output, ChatSettings(**{**GREEDY, **settings}))
    return output.getvalue(), transcript, output


def test_a_scripted_session_streams_the_greedy_replies_to_the_whole_conversation(base, loaded):
    model, tokenizer = loaded
    text, transcript, output = run(base, "hi\n  a b  \n", system="Be brief.")
    system = {"role": "system", "content": "Be brief."}
    first = greedy_text(model, tokenizer, [system, {"role": "user", "content": "hi"}], 8)
    assert transcript.dropped_exchanges == 0
    second = greedy_text(model, tokenizer, [system, {"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": first.strip()},
                                            {"role": "user", "content": "a b"}], 8)
    assert f"{REPLY_PREFIX}{first}\n{REPLY_PREFIX}{second}\n" in text
    assert transcript.replies == [first.strip(), second.strip()]
    assert transcript.messages[0] == system and transcript.messages[-1]["content"] == second.strip()
    start = output.pieces.index(REPLY_PREFIX)
    assert len(output.pieces[start + 1: output.pieces.index("\n", start)]) > 1  # in pieces, as generated


class ScriptedModel(nn.Module):
    """Stands in for a Transformer: its logits pick the scripted tokens in turn, whatever the input."""

    def __init__(self, tokens: list[int], vocab_size: int, context_length: int = 64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, context_length=context_length)
        self.tokens, self.calls = tokens, 0

    def new_cache(self, batch_size: int, max_length: int):
        return None

    def forward(self, ids, cache=None):
        logits = torch.zeros(1, ids.shape[1], self.config.vocab_size)  # (1, T, V)
        logits[0, -1, self.tokens[min(self.calls, len(self.tokens) - 1)]] = 1.0
        self.calls += 1
        return logits, None


def test_a_character_split_across_tokens_is_written_whole_and_the_end_of_turn_stops_the_reply(loaded):
    _, tokenizer = loaded
    end_of_turn = tokenizer.special_tokens[IM_END]
    tokens = [ord("h"), 0xC3, 0xA9, ord("!"), end_of_turn, ord("x")]  # "é" is the two bytes C3 A9
    output = RecordingOutput()
    session = ChatSession(ScriptedModel(tokens, tokenizer.vocab_size), tokenizer, ChatSettings(**GREEDY), output)
    session.handle("hi")
    assert output.getvalue() == f"{REPLY_PREFIX}hé!\n"
    assert "\ufffd" not in "".join(output.pieces) and "é" in output.pieces  # held back until whole, then written
    assert session.messages[-1] == {"role": "assistant", "content": "hé!"}


def test_reset_forgets_the_conversation_but_keeps_the_system_prompt(base, loaded):
    text, transcript, _ = run(base, "hi\nmore please\n/reset\nhi\n", system="Be brief.")
    assert "[conversation reset]" in text
    assert transcript.replies[2] == transcript.replies[0] != transcript.replies[1]
    assert [message["role"] for message in transcript.messages] == ["system", "user", "assistant"]


def test_history_is_trimmed_oldest_first_to_keep_the_prompt_in_the_context(base, loaded):
    model, tokenizer = loaded
    context = model.config.context_length  # 128
    system = {"role": "system", "content": "Be brief."}
    history = [system]
    for number in range(12):
        history += [{"role": "user", "content": f"question {number}"}, {"role": "assistant", "content": "an answer"}]
    history.append({"role": "user", "content": "last question"})
    kept, rendered, dropped = fit_to_context(history, tokenizer, context, reply_room=8)
    assert len(rendered.prompt_ids) + 8 <= context and dropped > 0
    assert kept[0] == system and kept[1:] == history[1 + 2 * dropped:]  # the newest turns, whole exchanges
    assert rendered.prompt_ids == render_chat(kept, tokenizer).prompt_ids

    script = "".join(f"tell me about item number {number}, please\n" for number in range(8))
    text, transcript, _ = run(base, script, system="Be brief.")
    assert transcript.dropped_exchanges > 0 and "[dropped the oldest" in text
    assert len(transcript.replies) == 8
    prompt = transcript.messages[:-1]
    assert len(render_chat(prompt, tokenizer).prompt_ids) + 8 <= context
    assert transcript.replies[-1] == greedy_text(model, tokenizer, prompt, 8).strip()


def test_a_message_too_long_for_the_context_is_not_sent(base):
    text, transcript, _ = run(base, "word " * 150 + "\nhi\n")
    assert "too long for the model's context of 128 tokens" in text
    assert len(transcript.replies) == 1 and transcript.messages[0]["content"] == "hi"


def test_end_of_input_and_exit_end_the_session(base):
    assert run(base, "")[1].replies == []
    text, transcript, _ = run(base, "/exit\nhi\n")
    assert transcript.replies == [] and REPLY_PREFIX not in text
    assert len(run(base, "hi")[1].replies) == 1  # a last line without a newline is still answered
    text, transcript, _ = run(base, "/help\n")
    assert "unknown command /help" in text and transcript.replies == []


def test_sampling_with_a_seed_is_reproducible(base):
    first = run(base, "hi\nhi\n", temperature=1.0, seed=7)[1].replies
    assert run(base, "hi\nhi\n", temperature=1.0, seed=7)[1].replies == first
    assert run(base, "hi\nhi\n", temperature=1.0, seed=8)[1].replies != first


def test_the_chat_verb_parses_its_options_and_talks_on_stdin(base, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="binarylm")
    add_chat_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["chat", "-c", str(base), "--temperature", "0", "--top-p", "0.5",
                              "--max-new-tokens", "4", "--seed", "1", "--system", "Be brief."])
    assert args.run is chat and (args.top_p, args.max_new_tokens, args.seed) == (0.5, 4, 1)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    args.run(args)
    assert REPLY_PREFIX in capsys.readouterr().out
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(max_new_tokens=0)):
        with pytest.raises(BinaryLMError):
            chat_session(str(base), io.StringIO("hi\n"), io.StringIO(), ChatSettings(**bad))


def test_a_tokenizer_without_chat_tokens_talks_in_the_plain_format_and_stops_at_the_next_user_turn():
    tokenizer = train_bpe(["plain text"], vocab_size=257, special_tokens=["<|endoftext|>"], progress=False)
    tokens = list(b" hi\nUser: more")  # byte-level ids are the bytes themselves
    output = RecordingOutput()
    settings = ChatSettings(temperature=0.0, max_new_tokens=20)
    session = ChatSession(ScriptedModel(tokens, tokenizer.vocab_size), tokenizer, settings, output)
    session.handle("hello")
    assert output.getvalue() == f"{REPLY_PREFIX}hi\n"
    assert session.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
