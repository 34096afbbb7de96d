"""The request bodies of the OpenAI-style API, and how they become engine settings.

Field names and meanings follow the OpenAI completions API and vLLM's
extensions (top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos).
Unknown fields are refused with a 400 that names them, rather than ignored.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from binarylm.errors import BinaryLMError
from binarylm.infer.sampling import SamplingParams


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The settings completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's -1 (off) is accepted as 0
    min_p: float = 0.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] = Field(default_factory=dict)
    ignore_eos: bool = False
    user: str | None = None

    def sampling_params(self, logprobs: int | None = None, prompt_logprobs: bool = False) -> SamplingParams:
        try:
            bias = {int(token): value for token, value in self.logit_bias.items()}
        except ValueError:
            raise BinaryLMError("logit_bias keys must be token ids (strings of whole numbers)") from None
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_k=max(self.top_k, 0), top_p=self.top_p,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=bias, stop=_as_list(self.stop),
            stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos, seed=self.seed, n=self.n,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # the legacy API: how many alternatives per token
    echo: bool = False

    def settings(self) -> SamplingParams:
        return self.sampling_params(self.logprobs, prompt_logprobs=self.echo and self.logprobs is not None)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str
    name: str | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int = 0

    def settings(self) -> SamplingParams:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self.sampling_params(self.top_logprobs if self.logprobs else None)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    add_special_tokens: bool = False  # BinaryLM adds none; accepted for vLLM clients


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[int]
    model: str | None = None


def _as_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
