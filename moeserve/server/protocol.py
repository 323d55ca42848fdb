"""The OpenAI request bodies (pydantic, the HTTP edge) and their conversion to engine inputs.

In:  JSON bodies of POST /v1/completions and /v1/chat/completions, already parsed by FastAPI into
     these models (a wrong type is a 400 before any code here runs). Types are strict: a boolean
     is not an integer, a string is not a boolean or a number, and NaN or ±Infinity is refused
     for every float (JSON parsers that accept `NaN` would otherwise hand it to the sampler).
Out: `EngineRequest`: the prompts (text or token ids) and one `SamplingParams` per choice. Bounds
     the engine does not know (n, max_tokens against the context, logprobs count, unsupported
     OpenAI options) are checked here, each failure an `ApiError` 400 naming the parameter.
     The engine never sees pydantic; the response side is plain dicts (serving_*.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moeserve.engine.sampling_params import SamplingParams
from moeserve.errors import InputError
from moeserve.server.errors import ApiError
from moeserve.tokenizer import check_unicode

_SEED_SPACE = 2**64  # torch generators take seeds in [0, 2**64)


@dataclass(frozen=True)
class Limits:
    """Per-request bounds, set by the server's configuration."""

    max_model_len: int
    vocab_size: int
    max_n: int = 16
    max_choices: int = 512  # prompts × n in one request; the server sets it to what can ever be admitted
    max_logprobs: int = 20


@dataclass
class EngineRequest:
    prompts: list[str | list[int]]  # one per prompt; each runs `n` times
    params: list[SamplingParams]  # one per choice, prompt-major: choice i is prompt i // n
    n: int
    echo: bool = False
    internal_max_tokens_zero: bool = False  # max_tokens=0 with echo: score the prompt, return no new token


class StrictModel(BaseModel):
    """Base of every request model: JSON types are taken as they are, never coerced."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool = False


class _SamplingFields(StrictModel):
    """Options shared by both endpoints. Unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension (benchmarks)
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def _check_common(self, limits: Limits, max_tokens: int | None, name: str) -> None:
        if not 1 <= self.n <= limits.max_n:
            raise ApiError(400, f"n must be between 1 and {limits.max_n}, got {self.n}.", "n")
        if max_tokens is not None and max_tokens > limits.max_model_len:
            raise ApiError(
                400,
                f"{name} must be at most {limits.max_model_len} (the model's context), got {max_tokens}.",
                name,
            )
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ApiError(400, f"seed must fit in 64 bits, got {self.seed}.", "seed")
        if self.stop == "" or (isinstance(self.stop, list) and "" in self.stop):
            # An empty stop string would end every choice before its first token; refused in both forms.
            raise ApiError(
                400, f"stop must be a non-empty string or a list of them, got {json.dumps(self.stop)}.", "stop"
            )
        for stop in [self.stop] if isinstance(self.stop, str) else self.stop or []:
            check_text(stop, "stop")
        bad = next((t for t in self.stop_token_ids or [] if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise ApiError(
                400,
                f"stop_token_ids has {bad}, which is not in the vocabulary (ids 0..{limits.vocab_size - 1}).",
                "stop_token_ids",
            )
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed together with stream=true.", "stream_options")
        for option in ("presence_penalty", "frequency_penalty"):
            if getattr(self, option):
                raise ApiError(400, f"{option} is not supported by moeserve; leave it out or set it to 0.", option)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by moeserve; leave it out.", "logit_bias")

    def _params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None, count: int
    ) -> list[SamplingParams]:
        """`count` choices; with a seed, choice i of each prompt draws from seed + i, so n=1 and the
        first of n=2 agree, and the choices differ from each other but repeat across calls."""
        options: dict[str, Any] = dict(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            stop=[] if self.stop is None else self.stop,  # "" is refused by SamplingParams, as [""] is
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        params = []
        for i in range(count):
            seed = None if self.seed is None else (self.seed + i % self.n) % _SEED_SPACE
            try:
                params.append(SamplingParams(**options, seed=seed))
            except InputError as exc:  # e.g. "temperature must be a number >= 0 ..., got -1."
                name = str(exc).split()[0]
                raise ApiError(400, str(exc), name if name in options else None) from None
        return params


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def to_engine(self, limits: Limits) -> EngineRequest:
        self._check_common(limits, self.max_tokens, "max_tokens")
        prompts = _prompt_list(self.prompt)
        if len(prompts) * self.n > limits.max_choices:
            raise ApiError(
                400,
                f"{len(prompts)} prompts × n={self.n} is more than the {limits.max_choices} sequences this server "
                f"can hold; send fewer prompts per request.",
                "prompt",
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= limits.max_logprobs:
            raise ApiError(
                400, f"logprobs must be between 0 and {limits.max_logprobs}, got {self.logprobs}.", "logprobs"
            )
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of is not supported by moeserve; leave it out or set it to n.", "best_of")
        if self.suffix:
            raise ApiError(400, "suffix is not supported by moeserve; leave it out.", "suffix")
        max_tokens, zero = self.max_tokens, False
        if max_tokens == 0 and self.echo:
            max_tokens, zero = 1, True  # scoring only: one token is generated and not returned
        elif max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1 (or 0 with echo=true), got {max_tokens}.", "max_tokens")
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        params = self._params(max_tokens, self.logprobs, prompt_logprobs, len(prompts) * self.n)
        return EngineRequest(prompts, params, self.n, echo=self.echo, internal_max_tokens_zero=zero)


class TextPart(StrictModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(StrictModel):
    model_config = ConfigDict(extra="allow")  # e.g. tool_calls: handed to the chat template as is
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def to_template(self, index: int) -> dict[str, Any]:
        content = self.content
        if content is None and self.role != "assistant":
            # OpenAI's schema lets only an assistant message (one that calls tools) go without content.
            raise ApiError(
                400,
                f"messages[{index}].content is null or missing; a {self.role} message needs text content.",
                "messages",
            )
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ApiError(
                        400,
                        f"messages[{index}] has a {part.type!r} part; this model reads text parts only.",
                        "messages",
                    )
            content = "".join(part.text for part in content)
        for field, text in (("role", self.role), ("content", content or ""), ("name", self.name or "")):
            check_text(text, f"messages[{index}].{field}")
        message = {**(self.model_extra or {}), "role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True  # vLLM extension

    def to_engine(self, limits: Limits) -> tuple[list[dict[str, Any]], list[SamplingParams]]:
        """The messages for the chat template and one SamplingParams per choice."""
        name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        self._check_common(limits, max_tokens, name)
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"{name} must be at least 1, got {max_tokens}.", name)
        if self.n > limits.max_choices:
            raise ApiError(
                400, f"n={self.n} is more than the {limits.max_choices} sequences this server can hold.", "n"
            )
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs=true.", "top_logprobs")
            if not 0 <= self.top_logprobs <= limits.max_logprobs:
                raise ApiError(
                    400,
                    f"top_logprobs must be between 0 and {limits.max_logprobs}, got {self.top_logprobs}.",
                    "top_logprobs",
                )
        if self.tools:
            raise ApiError(400, "tools are not supported by moeserve; leave them out.", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ApiError(400, "response_format other than text is not supported by moeserve.", "response_format")
        messages = [m.to_template(i) for i, m in enumerate(self.messages)]
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return messages, self._params(max_tokens, logprobs, None, self.n)


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty; send a string, a list of strings or a list of token ids.", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]  # one prompt as token ids
    for i, p in enumerate(prompt):
        if not p:
            raise ApiError(400, f"prompt[{i}] is empty; every prompt needs at least one token.", "prompt")
    return list(prompt)


def check_text(text: str, name: str) -> None:
    """A 400 naming `name` (such as messages[2].content) when `text` is not valid Unicode: the tokenizer
    cannot take it."""
    try:
        check_unicode(text, name)
    except InputError as exc:
        raise ApiError(400, str(exc), name.split("[")[0]) from None


def stream_usage(request: _SamplingFields) -> bool:
    return bool(request.stream and request.stream_options and request.stream_options.include_usage)
