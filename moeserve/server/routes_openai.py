"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

Thin: FastAPI parses and type-checks the body into the protocol models (a wrong type is a 400 via
errors.py); the serving classes do the work. Auth and body size were checked by the middleware.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from moeserve.server.protocol import ChatCompletionRequest, CompletionRequest

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return await request.app.state.server.completions.create(body, request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await request.app.state.server.chat.create(body, request)


@router.get("/v1/models")
async def models(request: Request):
    server = request.app.state.server
    table = server.variants
    data = []
    for name, variant in table.names.items():
        data.append(
            {
                "id": name,
                "object": "model",
                "created": server.started,
                "owned_by": "moeserve",
                "root": str(server.llm.model_dir),
                "parent": None if name == table.model_name else table.model_name,
                "max_model_len": server.llm.max_model_len,
                "policy": variant.current.system_fingerprint,
            }
        )
    return {"object": "list", "data": data}
