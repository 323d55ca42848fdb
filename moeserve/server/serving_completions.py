"""POST /v1/completions: a `CompletionRequest` → admitted sequences → one JSON response or an SSE stream.

In:  the validated request (protocol.py), the variant its `model` names (variants.py).
Out: OpenAI's `text_completion` object (choices, usage, logprobs with optional echo of the prompt
     and its logprobs, as lm-eval's `local-completions` loglikelihood tasks read them), or its
     chunks. Choice i belongs to prompt i // n. `system_fingerprint` names the policy that served it.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from moeserve.server.async_engine import AsyncEngine, RequestHandle
from moeserve.server.errors import error_event
from moeserve.server.prompt_guard import PromptGuard
from moeserve.server.protocol import CompletionRequest, EngineRequest, Limits, stream_usage
from moeserve.server.serving_common import Choice, collect_choices, TokenText, completion_logprobs, merge, now, usage
from moeserve.server.streaming import DONE, EventStream, sse, unless_disconnected
from moeserve.server.variants import VariantTable


class CompletionServing:
    def __init__(
        self, engine: AsyncEngine, variants: VariantTable, limits: Limits, token_text: TokenText, guard: PromptGuard
    ):
        self.engine, self.variants, self.limits, self.token_text = engine, variants, limits, token_text
        self.guard = guard

    async def create(self, request: CompletionRequest, raw: Request) -> Response:
        variant = self.variants.lookup(request.model)
        engine_request = request.to_engine(self.limits)
        await asyncio.to_thread(self._check_sizes, engine_request.prompts)
        handle = await self.engine.add_request(engine_request.prompts, engine_request.params, variant)
        model = request.model or variant.name
        if request.stream:
            return EventStream(self._stream(handle, request, engine_request, model), on_close=handle.abort)
        choices = await unless_disconnected(raw.receive, collect_choices(handle))
        if choices is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return JSONResponse(self._response(handle, engine_request, model, choices))

    def _check_sizes(self, prompts: list[str | list[int]]) -> None:
        """Text prompts too long for the context are refused before the engine tokenizes them."""
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                self.guard.check_prompt(prompt, "prompt" if len(prompts) == 1 else f"prompt[{i}]")

    def _prompt_text(self, handle: RequestHandle, engine_request: EngineRequest, index: int) -> str:
        prompt = engine_request.prompts[index // engine_request.n]
        return prompt if isinstance(prompt, str) else self.token_text.decode(handle.seqs[index].prompt_ids)

    def _echo_logprobs(self, handle: RequestHandle, index: int, choice: Choice) -> tuple[list[int], list]:
        """Prompt ids and their logprob entries when echo is set with logprobs, else nothing."""
        if choice.prompt_logprobs is None:
            return [], []
        return handle.seqs[index].prompt_ids, choice.prompt_logprobs

    def _response(
        self, handle: RequestHandle, engine_request: EngineRequest, model: str, choices: list[Choice]
    ) -> dict:
        out = []
        for i, choice in enumerate(choices):
            ids, entries = list(choice.token_ids), list(choice.logprobs)
            if engine_request.internal_max_tokens_zero:
                ids, entries, choice.text = [], [], ""
            text = choice.text
            if engine_request.echo:
                text = self._prompt_text(handle, engine_request, i) + text
            logprobs = None
            if handle.seqs[i].params.logprobs is not None:
                prompt_ids, prompt_entries = self._echo_logprobs(handle, i, choice)
                logprobs = completion_logprobs(self.token_text, prompt_ids + ids, prompt_entries + entries)
            finish = "length" if engine_request.internal_max_tokens_zero else choice.finish_reason
            out.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                    "stop_reason": choice.stop_reason,
                }
            )
        completion_tokens = 0 if engine_request.internal_max_tokens_zero else sum(len(c.token_ids) for c in choices)
        return {
            "id": f"cmpl-{handle.request_id}",
            "object": "text_completion",
            "created": now(),
            "model": model,
            "system_fingerprint": handle.generation.system_fingerprint,
            "choices": out,
            "usage": usage(handle.seqs[:: engine_request.n], completion_tokens),
        }

    async def _stream(
        self, handle: RequestHandle, request: CompletionRequest, engine_request: EngineRequest, model: str
    ) -> AsyncIterator[bytes]:
        head = {
            "id": f"cmpl-{handle.request_id}",
            "object": "text_completion",
            "created": now(),
            "model": model,
            "system_fingerprint": handle.generation.system_fingerprint,
        }
        wants_logprobs = [seq.params.logprobs is not None for seq in handle.seqs]
        zero = engine_request.internal_max_tokens_zero
        completion_tokens = 0
        try:
            if engine_request.echo and not any(s.params.prompt_logprobs is not None for s in handle.seqs):
                for i in range(len(handle.seqs)):  # echo without logprobs: the prompt text comes first
                    yield sse({**head, "choices": [self._chunk(i, self._prompt_text(handle, engine_request, i))]})
            async for batch in handle.updates():
                for i, update in sorted(merge(batch).items()):
                    finished = update.finish_reason is not None
                    ids = [] if zero else update.token_ids
                    completion_tokens += len(ids)
                    text = "" if zero else update.text_delta
                    logprobs = None
                    if update.prompt_logprobs is not None:  # echo with logprobs: the prompt and its logprobs
                        text = self._prompt_text(handle, engine_request, i) + text
                        prompt_ids = handle.seqs[i].prompt_ids
                        logprobs = completion_logprobs(
                            self.token_text,
                            prompt_ids + ids,
                            update.prompt_logprobs + ([] if zero else update.logprobs),
                        )
                    elif wants_logprobs[i] and ids:
                        logprobs = completion_logprobs(self.token_text, ids, update.logprobs)
                    if text or logprobs or finished:
                        finish = ("length" if zero else update.finish_reason) if finished else None
                        stop = update.stop_reason if finished else None
                        yield sse({**head, "choices": [self._chunk(i, text, logprobs, finish, stop)]})
            if stream_usage(request):
                yield sse(
                    {
                        **head,
                        "choices": [],
                        "usage": usage(handle.seqs[:: engine_request.n], completion_tokens),
                    }
                )
        except Exception as exc:  # after the 200 header: report in-band
            yield error_event(exc)
        finally:
            handle.abort()
        yield DONE

    @staticmethod
    def _chunk(index: int, text: str, logprobs=None, finish_reason=None, stop_reason=None) -> dict:
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
        }
