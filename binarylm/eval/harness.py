"""lm-evaluation-harness on a BinaryLM checkpoint: the harness's `binarylm` model.

The harness turns every task (HellaSwag, LAMBADA, GSM8K, wikitext, ...) into requests of
three kinds and hands a model each kind in one list. This module answers them:

- loglikelihood, args (context, continuation) -> (log p(continuation | context), is_greedy).
  Multiple-choice tasks send one per choice and pick the likeliest. We answer with
  `scoring.score_pairs`, all requests at once: the same split into tokens (the context's
  trailing whitespace moves onto the continuation), the same batched forward passes, so
  the harness sees exactly the numbers of our own scorer.
- loglikelihood_rolling, args (text,) -> log p(text), for perplexity and bits per byte.
  The text is encoded as plain text (`encode_ordinary`), read after the end-of-text token,
  and scored by `scoring.rolling_logprobs`: full windows of the model's context, one ending
  every `stride` tokens (default half a context), each scoring the tokens the one before
  did not, so every token is scored once. stride = the context is the scheme lm-eval's
  `LM.loglikelihood_rolling` describes; the default gives each token more history.
- generate_until, args (context, gen_kwargs) -> the text generated after the context,
  ending before the first of the `until` strings or after `max_gen_toks` tokens. Greedy
  unless `do_sample` (lm-eval's own rules: `normalize_gen_kwargs`); temperature, top_k,
  top_p, min_p, the penalties and seed are honoured. All requests are queued on one shared
  `infer.Engine`, which decodes them together (continuous batching). A context longer than
  the model's window keeps its latest tokens, leaving room for the new ones.

Chat models: with `--apply_chat_template` the harness renders each conversation through
`apply_chat_template` (our `data.chat.render_chat`: ChatML when the tokenizer has its
tokens) into a string. From then on, contexts may spell <|im_start|> and <|im_end|>, which
are read as those special tokens, and generation also stops at <|im_end|>. The string
round trip gives render_chat's ids unless a message's text starts with a newline (it may
then merge with the role header's).

Use it from Python (importing this module registers the name):

    import lm_eval
    import binarylm.eval.harness  # noqa: F401
    lm_eval.simple_evaluate(model="binarylm", model_args="checkpoint=runs/demo", tasks=["hellaswag"])

or from the command line, which is lm_eval's own (same arguments and subcommands):

    python -m binarylm.eval.harness --model binarylm --model_args checkpoint=runs/demo,batch_size=16 \\
        --tasks hellaswag --output_path results/

model_args: checkpoint (required: a checkpoint or run directory), device (default cpu; a
CUDA device falls back to the CPU where there is none, as the harness's command line asks
for cuda:0 by default), batch_size (sequences per forward pass and engine slots: given
in model_args it wins over the harness's --batch_size; otherwise that one, whose
command-line default is 1; 16 from simple_evaluate without one; "auto" means 16),
max_gen_toks (default 256, when a task gives none), stride (rolling windows).

Why not the bare `lm_eval --model binarylm`: lm-eval 0.4.13 looks model names up in its
registry, which holds its own models (lm_eval/models/__init__.py) plus whatever classes
code that has already run registered. It reads no entry-point group (its registry can
hold an EntryPoint, but nothing ever lists installed ones), no environment variable, and
--include_path and task files add tasks, not models. So after `pip install binarylm` the
bare command still cannot see this class, and `python -m binarylm.eval.harness` (this
module's `main`) is the way. (Importing lm_eval.models below matters too: the harness
loads its own model names only into an empty registry, so registering ours first would
hide "hf" and the rest.)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import lm_eval.models  # noqa: F401  the harness's own model names, before ours (see above)
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import simple_parse_args_string, warning_once
from tqdm import tqdm

from binarylm.checkpoint import load_checkpoint
from binarylm.data.chat import RenderedChat, render_chat
from binarylm.errors import BinaryLMError
from binarylm.eval.scoring import Score, rolling_logprobs, score_pairs, score_token_pairs, split_pair
from binarylm.infer.engine import Engine
from binarylm.infer.sampling import SamplingParams
from binarylm.tokenizer import IM_END, IM_START

DEFAULT_BATCH = 16
DEFAULT_MAX_GEN_TOKS = 256
CHUNK_BATCHES = 32  # requests handed over per progress-bar step, in batches: big enough to batch well
SAMPLING_KEYS = ("top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed")
MODEL_ARGS = ("checkpoint", "device", "batch_size", "max_gen_toks", "stride")

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Answer = TypeVar("Answer")


@register_model("binarylm")
class BinaryLM(LM):
    """A BinaryLM checkpoint answering the harness's three request types (see the module docstring)."""

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", batch_size: int | str = DEFAULT_BATCH,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, stride: int | None = None,
                 max_batch_size: int | None = None, **unknown: Any) -> None:
        super().__init__()
        _check_model_args(checkpoint, unknown)
        saved = load_checkpoint(checkpoint, device=_usable_device(device))
        self.model, self.tokenizer, self.path = saved.model, saved.tokenizer, saved.path
        self.window = self.model.config.context_length
        self.batch_size = _positive("batch_size", DEFAULT_BATCH if str(batch_size).startswith("auto") else batch_size)
        self.max_gen_toks = _positive("max_gen_toks", max_gen_toks)
        self.stride = _positive("stride", stride) if stride else None
        self._device = next(self.model.parameters()).device
        self._chat: RenderedChat | None = None  # set once the harness renders a chat with our template

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> BinaryLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> BinaryLM:
        """Our model_args win over the harness's own settings (its command line always sends batch_size=1 and
        device=cuda:0), where the base class would fail on a name given twice."""
        harness = {key: value for key, value in (additional_config or {}).items() if value is not None}
        return cls(**(harness | dict(arg_dict)))

    # ------------------------------------------------------------------ the three request types

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        pairs = [tuple(request.args) for request in requests]
        scores = _in_chunks(pairs, self._scores, "loglikelihood", CHUNK_BATCHES * self.batch_size)
        return [(score.logprob, score.greedy) for score in scores]

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        texts = [request.args[0] for request in requests]
        return _in_chunks(texts, lambda chunk: [self._rolling(text) for text in chunk], "loglikelihood_rolling", 1)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        jobs = [self._generation_job(context, gen_kwargs) for context, gen_kwargs in (r.args for r in requests)]
        return _in_chunks(jobs, self._generate, "generate_until", CHUNK_BATCHES * self.batch_size)

    def _scores(self, pairs: list[tuple[str, str]]) -> list[Score]:
        if not self._specials:
            return score_pairs(self.model, self.tokenizer, pairs, self.batch_size)
        return score_token_pairs(self.model, [self._chat_pair(*pair) for pair in pairs], self.tokenizer.eot_id,
                                 self.batch_size)

    def _chat_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """split_pair on what follows the context's last special token; the part up to it is encoded with the
        special tokens as ids (special tokens never merge with their neighbours, so the parts encode apart)."""
        cut = max((context.rfind(name) + len(name) for name in self._specials if name in context), default=0)
        context_ids, continuation_ids = split_pair(self.tokenizer, context[cut:], continuation)
        return self._encode(context[:cut]) + context_ids, continuation_ids

    def _rolling(self, text: str) -> float:
        ids = self.tokenizer.encode_ordinary(text)
        return rolling_logprobs(self.model, ids, self._prefix_id(), self.stride, self.batch_size).sum().item()

    def _generation_job(self, context: str, gen_kwargs: dict) -> tuple[list[int], SamplingParams]:
        """The prompt ids and sampling settings of one generate_until request."""
        settings = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        new_tokens = settings.pop("max_gen_toks")
        if new_tokens >= self.window:
            warning_once(log, f"max_gen_toks={new_tokens} does not fit the model's context of {self.window} "
                              f"tokens; generating at most {self.window - 1}")
            new_tokens = self.window - 1
        stop = [text for text in settings.pop("until") if text]
        temperature = float(settings.pop("temperature", 0.0)) if settings.pop("do_sample") else 0.0
        extra = {key: settings.pop(key) for key in SAMPLING_KEYS if key in settings}
        if settings:
            warning_once(log, f"binarylm ignores the generation settings {sorted(settings)}; it understands "
                              f"until, max_gen_toks, do_sample, temperature and {', '.join(SAMPLING_KEYS)}")
        if self._chat is not None:
            stop += self._chat.stop
            extra["stop_token_ids"] = self._chat.stop_token_ids
        prompt = self._encode(context)[-(self.window - new_tokens):] or [self._prefix_id()]
        return prompt, SamplingParams(max_tokens=new_tokens, temperature=temperature, stop=stop, **extra)

    def _generate(self, jobs: list[tuple[list[int], SamplingParams]]) -> list[str]:
        completions = self.engine.generate([prompt for prompt, _ in jobs], [params for _, params in jobs])
        return [completion.samples[0].text for completion in completions]

    @functools.cached_property
    def engine(self) -> Engine:
        """The inference engine, built on first use (its KV cache is only needed for generation)."""
        return Engine(self.model, self.tokenizer, max_batch=self.batch_size)

    # ------------------------------------------------------------------ tokens

    @property
    def _specials(self) -> set[str]:
        """The special tokens a context may spell: the chat ones, once a chat was rendered with our template."""
        return {IM_START, IM_END} & self.tokenizer.special_tokens.keys() if self._chat is not None else set()

    def _encode(self, text: str) -> list[int]:
        if not self._specials:
            return self.tokenizer.encode_ordinary(text)
        return self.tokenizer.encode(text, allowed_special=self._specials, disallowed_special=())

    def _prefix_id(self) -> int:
        if self.tokenizer.eot_id is None:
            raise BinaryLMError(f"the tokenizer of {self.path} has no end-of-text token, which starts a text scored "
                                "whole (loglikelihood_rolling) or an empty prompt; use a task with contexts")
        return self.tokenizer.eot_id

    # ------------------------------------------------------------------ chat and bookkeeping

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self._chat = render_chat(chat_history, self.tokenizer, add_generation_prompt)
        return self.tokenizer.decode(self._chat.prompt_ids)

    def chat_template(self, chat_template: bool | str = False) -> str:
        """Our one template, shown on a one-message chat (a template name asked for is not ours to choose)."""
        if isinstance(chat_template, str):
            warning_once(log, f"binarylm has one chat template; ignoring the name {chat_template!r}")
        example = render_chat([{"role": "user", "content": "{content}"}], self.tokenizer)
        return self.tokenizer.decode(example.prompt_ids)

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer (and so the template) in the harness's request-cache keys: a digest of its file."""
        return "binarylm-" + hashlib.sha256((self.path / "tokenizer.json").read_bytes()).hexdigest()[:16]

    def get_model_info(self) -> dict[str, Any]:
        return {"checkpoint": str(self.path), "model_num_parameters": sum(p.numel() for p in self.model.parameters())}


def _check_model_args(checkpoint: str | None, unknown: dict[str, Any]) -> None:
    if unknown:
        raise BinaryLMError(f"unknown model_args {', '.join(sorted(unknown))} for binarylm; "
                            f"it takes {', '.join(MODEL_ARGS)}")
    if not checkpoint:
        raise BinaryLMError("binarylm needs a checkpoint: pass model_args checkpoint=DIR, a checkpoint or run "
                            "directory (e.g. --model_args checkpoint=runs/demo)")


def _usable_device(device: str) -> str:
    """`device`, or the CPU when it names a CUDA device on a machine without one (as HF's lm-eval model does)."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise BinaryLMError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        log.warning("device %s asked for, but CUDA is not available: running on the CPU", device)
        return "cpu"
    return device


def _positive(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise BinaryLMError(f"{name} must be a whole number of at least 1, got {value!r}")
    return number


def _in_chunks(items: list[Item], answer: Callable[[list[Item]], list[Answer]], what: str,
               size: int) -> list[Answer]:
    """answer(chunk) for consecutive chunks of `items`, with a progress bar: one list of answers in order."""
    answers: list[Answer] = []
    with tqdm(total=len(items), desc=f"binarylm {what}", disable=not items) as bar:
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            answers += answer(chunk)
            bar.update(len(chunk))
    return answers


def main(argv: Sequence[str] | None = None) -> int:
    """lm_eval's own command line with the `binarylm` model registered (this module is imported by now)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]  # the harness's parser reads sys.argv itself
    try:
        cli_evaluate()
    except BinaryLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
