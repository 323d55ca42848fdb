"""moeserve.server: the OpenAI-compatible HTTP server (FastAPI + uvicorn), the top layer of the package.

    protocol.py       pydantic request models (strict types) → prompts + SamplingParams (the engine never sees pydantic)
    prompt_guard.py   refuses a text too long for the context by its length, before tokenizing it
    routes_tokenizer.py  /tokenize, /detokenize, /tokenizer_info (vLLM's form, what lm-eval's remote tokenizer reads)
    async_engine.py   the async scheduler: admission, a step thread driving LLMEngine, per-request queues
    variants.py       served names (MODEL, MODEL@NAME) → the policy generation a request is bound to
    policy_jobs.py    PUT /v1/policy: validate, re-encode in the background, switch
    serving_*.py      engine updates → OpenAI responses and SSE chunks
    streaming.py      SSE framing, stop-string hold-back, disconnect → abort
    metrics.py        Prometheus `moeserve:*`
    auth.py           API key and body size guards
    errors.py         every failure as OpenAI's error JSON with its 4xx
    app.py            create_app(llm, config), serve(...)

See docs/server.md.
"""

from moeserve.server.app import ServerConfig, create_app, serve

__all__ = ["ServerConfig", "create_app", "serve"]
