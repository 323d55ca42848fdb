"""POST /v1/chat/completions: messages → the model's chat template → admitted sequences → response.

In:  the validated request (protocol.py), the variant its `model` names (variants.py).
Out: OpenAI's `chat.completion` object, or `chat.completion.chunk` events: the first chunk of each
     choice carries the assistant role, the last its finish_reason; with stream_options.include_usage
     a final chunk with no choices carries the usage. `system_fingerprint` names the policy.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from moeserve.errors import InputError
from moeserve.server.async_engine import AsyncEngine, RequestHandle
from moeserve.server.errors import error_event
from moeserve.server.prompt_guard import PromptGuard
from moeserve.server.protocol import ChatCompletionRequest, Limits, stream_usage
from moeserve.server.serving_common import Choice, collect_choices, TokenText, chat_logprobs, merge, now, usage
from moeserve.server.streaming import DONE, EventStream, sse, unless_disconnected
from moeserve.server.variants import VariantTable
from moeserve.tokenizer import Tokenizer


class ChatServing:
    def __init__(
        self,
        engine: AsyncEngine,
        variants: VariantTable,
        limits: Limits,
        tokenizer: Tokenizer | None,
        token_text: TokenText,
        guard: PromptGuard,
    ):
        self.engine, self.variants, self.limits = engine, variants, limits
        self.tokenizer, self.token_text, self.guard = tokenizer, token_text, guard

    async def create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        variant = self.variants.lookup(request.model)
        messages, params = request.to_engine(self.limits)
        if self.tokenizer is None:
            raise InputError(
                "this model directory has no tokenizer.json, so chat cannot be used; send token ids to /v1/completions."
            )
        prompt = await asyncio.to_thread(self._encode, messages, request.add_generation_prompt)
        handle = await self.engine.add_request([prompt], params, variant)
        model = request.model or variant.name
        top_n = request.top_logprobs or 0
        if request.stream:
            return EventStream(self._stream(handle, request, model, top_n), on_close=handle.abort)
        choices = await unless_disconnected(raw.receive, collect_choices(handle))
        if choices is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return JSONResponse(self._response(handle, request, model, choices, top_n))

    def _encode(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """On a worker thread: render the template, refuse a text too long for the context, encode."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt)
        self.guard.check_prompt(text, "messages")
        # The rendered template already contains any BOS it wants; adding specials would double it.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _head(self, handle: RequestHandle, model: str) -> dict:
        return {
            "id": f"chatcmpl-{handle.request_id}",
            "created": now(),
            "model": model,
            "system_fingerprint": handle.generation.system_fingerprint,
        }

    def _response(
        self, handle: RequestHandle, request: ChatCompletionRequest, model: str, choices: list[Choice], top_n: int
    ) -> dict:
        out = []
        for i, choice in enumerate(choices):
            logprobs = (
                chat_logprobs(self.token_text, choice.token_ids, choice.logprobs, top_n) if request.logprobs else None
            )
            out.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": choice.text},
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                    "stop_reason": choice.stop_reason,
                }
            )
        return {
            **self._head(handle, model),
            "object": "chat.completion",
            "choices": out,
            "usage": usage(handle.seqs[:1], sum(len(c.token_ids) for c in choices)),
        }

    async def _stream(
        self, handle: RequestHandle, request: ChatCompletionRequest, model: str, top_n: int
    ) -> AsyncIterator[bytes]:
        head = {**self._head(handle, model), "object": "chat.completion.chunk"}
        completion_tokens = 0
        try:
            for i in range(len(handle.seqs)):
                yield sse({**head, "choices": [_chunk(i, {"role": "assistant", "content": ""})]})
            async for batch in handle.updates():
                for i, update in sorted(merge(batch).items()):
                    finished = update.finish_reason is not None
                    completion_tokens += len(update.token_ids)
                    text = update.text_delta
                    logprobs = None
                    if request.logprobs and update.token_ids:
                        logprobs = chat_logprobs(self.token_text, update.token_ids, update.logprobs, top_n)
                    if text or logprobs or finished:
                        delta = {"content": text} if text or not finished else {}
                        yield sse(
                            {
                                **head,
                                "choices": [
                                    _chunk(
                                        i,
                                        delta,
                                        logprobs,
                                        update.finish_reason,
                                        update.stop_reason if finished else None,
                                    )
                                ],
                            }
                        )
            if stream_usage(request):
                yield sse({**head, "choices": [], "usage": usage(handle.seqs[:1], completion_tokens)})
        except Exception as exc:  # after the 200 header: report in-band
            yield error_event(exc)
        finally:
            handle.abort()
        yield DONE


def _chunk(index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None) -> dict:
    return {
        "index": index,
        "delta": delta,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }
