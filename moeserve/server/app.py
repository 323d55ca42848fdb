"""`create_app(llm, config)`: the FastAPI app around one loaded model; `serve(...)`: run it with uvicorn.

    HTTP ─► DrainMiddleware ─► BodyLimitMiddleware ─► ApiKeyMiddleware ─► routes ─► CompletionServing / ChatServing
                                                                     │ prompts + SamplingParams
                                                                     ▼
                   variants (policy per served name) ─────────► AsyncEngine ─► step thread ─► LLMEngine
                   PolicyJobs (PUT /v1/policy) ─ switch ─────────┘

The app owns its AsyncEngine, metrics registry, variants and policy jobs, and takes over the LLM's expert
provider as the base variant's first policy generation (offloading options: the LLM's). The step thread starts
with the app (lifespan). On SIGINT / SIGTERM the server drains while the port stays open (shutdown.py):
new requests get 503, running ones finish (up to `drain_timeout` seconds, then they end with a 503), and
the step thread stops.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import FastAPI

from moeserve.llm import LLM
from moeserve.offload.runtime import build_offload_runtime
from moeserve.server.async_engine import AsyncEngine
from moeserve.server.auth import ApiKeyMiddleware, BodyLimitMiddleware, DrainMiddleware
from moeserve.server.errors import InternalErrorMiddleware, install_error_handlers
from moeserve.server.metrics import ServerMetrics
from moeserve.server.policy_jobs import PolicyJobs
from moeserve.server.prompt_guard import PromptGuard
from moeserve.server.protocol import Limits
from moeserve.server.routes_admin import router as admin_router
from moeserve.server.routes_openai import router as openai_router
from moeserve.server.routes_tokenizer import router as tokenizer_router
from moeserve.server.serving_chat import ChatServing
from moeserve.server.serving_common import TokenText
from moeserve.server.serving_completions import CompletionServing
from moeserve.server.variants import PolicyGeneration, VariantTable

logger = logging.getLogger("moeserve.server")


@dataclass
class ServerConfig:
    model_name: str | None = None  # served name; None: the model directory's name
    policies: dict[str, object] = field(default_factory=dict)  # NAME → policy (path, text, dict): MODEL@NAME
    base_policy_name: str | None = None  # the LLM was loaded with this named policy: MODEL aliases MODEL@NAME
    api_key: str | None = None
    max_waiting: int = 256  # sequences queued beyond the running limit; more → 429
    max_body_bytes: int = 4 * 2**20
    max_n: int = 16
    max_logprobs: int = 20
    drain_timeout: float = 30.0


@dataclass
class ServerState:
    llm: LLM
    config: ServerConfig
    engine: AsyncEngine
    variants: VariantTable
    metrics: ServerMetrics
    completions: CompletionServing
    chat: ChatServing
    jobs: PolicyJobs
    guard: PromptGuard
    started: int = field(default_factory=lambda: int(time.time()))


def default_model_name(llm: LLM) -> str:
    from moeserve.assets import DEFAULT_MODEL_DIR

    directory = Path(llm.model_dir).resolve()
    return "moeserve-default" if directory == DEFAULT_MODEL_DIR.resolve() else directory.name


def create_app(llm: LLM, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    metrics = ServerMetrics()
    engine = AsyncEngine(llm.engine, metrics, max_waiting=config.max_waiting)
    named = {  # built before the LLM hands its experts over, so a policy error leaves the LLM whole
        name: build_offload_runtime(llm.loaded, replace(llm.offload_options, policy=policy), llm.device, progress=False)
        for name, policy in config.policies.items()
        if name != config.base_policy_name  # that one is the LLM's own runtime
    }
    model_name = config.model_name or default_model_name(llm)
    variants = VariantTable(model_name, PolicyGeneration(*llm.hand_over_experts(), 0), config.base_policy_name)
    for name, runtime in named.items():
        variants.add(name, runtime)
    metrics.watch(engine.counts, lambda: variants.variants.values())
    metrics.watch_kv(llm.engine.kv_stats, model_name)
    limits = Limits(
        max_model_len=llm.max_model_len,
        vocab_size=llm.config.vocab_size,
        max_n=config.max_n,
        max_choices=engine.capacity,
        max_logprobs=config.max_logprobs,
    )
    token_text = TokenText(llm.tokenizer)
    guard = PromptGuard(llm.tokenizer, llm.max_model_len)
    state = ServerState(
        llm=llm,
        config=config,
        engine=engine,
        variants=variants,
        metrics=metrics,
        completions=CompletionServing(engine, variants, limits, token_text, guard),
        chat=ChatServing(engine, variants, limits, llm.tokenizer, token_text, guard),
        jobs=PolicyJobs(llm, engine, variants),
        guard=guard,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            state.jobs.shutdown()
            await engine.shutdown(config.drain_timeout)

    app = FastAPI(title="moeserve", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(InternalErrorMiddleware)  # added first: innermost, inside Starlette's, which re-raises
    app.include_router(openai_router)
    app.include_router(admin_router)
    app.include_router(tokenizer_router)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(DrainMiddleware, draining=lambda: engine.draining)  # added last: runs first
    return app


def serve(llm: LLM, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app until SIGINT / SIGTERM, then drain (shutdown.py) and return."""
    import uvicorn

    from moeserve.server.shutdown import FLUSH_SECONDS, DrainingServer

    if config.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without --api-key: anyone who can reach the port can use it", host)
    app = create_app(llm, config)
    uvicorn_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=FLUSH_SECONDS)
    DrainingServer(uvicorn_config, app.state.server.engine, config.drain_timeout).run()
