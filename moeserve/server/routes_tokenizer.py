"""The tokenizer endpoints as vLLM and SGLang serve them: POST /tokenize, POST /detokenize, GET /tokenizer_info.

In:  `{"prompt": str}` or `{"messages": [...]}` (rendered through the chat template) to tokenize;
     `{"tokens": [int]}` to detokenize; an optional `model` (an unknown one is a 404).
Out: `{"count", "max_model_len", "tokens", "token_strs"}`; `{"prompt": str}`; the tokenizer's
     special tokens, chat template and limits. lm-eval's `RemoteTokenizer`
     (`tokenizer_backend=remote`) reads exactly `tokens`, `prompt`, `eos_token`, `bos_token` and
     `chat_template`, at the server's root (it strips `/v1/completions` from its `base_url`).

Text is sized by the prompt guard and encoded on a worker thread, as for generation.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import Field

from moeserve.errors import InputError
from moeserve.server.errors import ApiError
from moeserve.server.protocol import ChatMessage, StrictModel
from moeserve.tokenizer import Tokenizer

router = APIRouter()


class TokenizeRequest(StrictModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (as vLLM)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int]


def _tokenizer(request: Request, model: str | None) -> Tokenizer:
    server = request.app.state.server
    server.variants.lookup(model)  # an unknown model is a 404, as on the generation endpoints
    if server.llm.tokenizer is None:
        raise ApiError(400, "this model directory has no tokenizer.json, so it cannot tokenize; send token ids.")
    return server.llm.tokenizer


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    tokenizer = _tokenizer(request, body.model)
    guard = request.app.state.server.guard
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "send exactly one of prompt (a string) and messages (a chat) to tokenize.", "prompt")

    def encode() -> list[int]:
        if body.messages is not None:
            messages = [m.to_template(i) for i, m in enumerate(body.messages)]
            text = tokenizer.apply_chat_template(messages, body.add_generation_prompt)
            guard.check(text, guard.max_model_len, "messages")
            return tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
        guard.check(body.prompt, guard.max_model_len, "prompt")
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        return tokenizer.encode(body.prompt, add_special_tokens=add_special)

    try:
        tokens = await asyncio.to_thread(encode)
    except InputError as exc:
        raise ApiError(400, str(exc), "messages") from None
    token_strs = None
    if body.return_token_strs:
        token_strs = [tokenizer.backend.id_to_token(t) for t in tokens]
    return {"count": len(tokens), "max_model_len": guard.max_model_len, "tokens": tokens, "token_strs": token_strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    tokenizer = _tokenizer(request, body.model)
    limit = request.app.state.server.guard.max_model_len
    if len(body.tokens) > limit:
        raise ApiError(
            400,
            f"tokens has {len(body.tokens)} ids, more than the model's context of {limit}; send at most {limit}.",
            "tokens",
        )
    vocab = tokenizer.vocab_size
    bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(
            400, f"tokens[{bad}] = {body.tokens[bad]} is not in the vocabulary (ids 0..{vocab - 1}).", "tokens"
        )
    text = await asyncio.to_thread(tokenizer.decode, body.tokens, False)
    return {"prompt": text}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    tokenizer = _tokenizer(request, None)
    special = {key: tokenizer.special_tokens.get(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return {
        **special,
        "eos_token_id": tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template,
        "model_max_length": request.app.state.server.guard.max_model_len,
        "vocab_size": tokenizer.vocab_size,
    }
