"""Operational routes: /health, /metrics, and the policy API (/v1/policy, /v1/policy/jobs/{id}).

GET /v1/policy?model=NAME: the variant's current resolved policy, one row per MoE layer with its
codec, bound, realised bits/value and compressed bytes. PUT /v1/policy?model=NAME with a YAML or
JSON policy as the body: validated at once (400 with the line and key on a mistake), re-encoded in
the background, answered with 202 and a job id (policy_jobs.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from moeserve.server.errors import error_response
from moeserve.server.metrics import CONTENT_TYPE
from moeserve.server.variants import Variant

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    engine = request.app.state.server.engine
    if not engine.healthy:  # (while the server drains, DrainMiddleware answers 503 before this route)
        return error_response(503, "the engine's step thread has stopped; restart the server.")
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(request: Request):
    return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/policy")
async def get_policy(request: Request, model: str | None = None):
    server = request.app.state.server
    return describe_policy(server.variants.lookup(model))


@router.put("/v1/policy")
async def put_policy(request: Request, model: str | None = None):
    job = await request.app.state.server.jobs.submit(model, await request.body())
    return JSONResponse(job.to_dict(), status_code=202)


@router.get("/v1/policy/jobs/{job_id}")
async def get_policy_job(job_id: str, request: Request):
    return request.app.state.server.jobs.get(job_id).to_dict()


def describe_policy(variant: Variant) -> dict:
    generation = variant.current
    runtime = generation.runtime
    result = {
        "object": "policy",
        "model": variant.name,
        "generation": generation.number,
        "fingerprint": generation.fingerprint,
        "system_fingerprint": generation.system_fingerprint,
        "offloaded": runtime is not None,
    }
    if runtime is None:
        return {
            **result,
            "policy": None,
            "layers": [],
            "note": "experts are resident and uncompressed; PUT /v1/policy to keep them compressed.",
        }
    sizes = runtime.store.layer_sizes()
    layers = []
    for layer, size in sorted(sizes.items()):
        settings = runtime.policy.layer_settings(layer)
        layers.append(
            {
                "layer": layer,
                "codec": "+".join(dict.fromkeys(s.codec for s in settings)),
                "mode": "+".join(dict.fromkeys(s.mode for s in settings if s.error_bound is not None)) or None,
                "error_bound": sorted({s.error_bound for s in settings if s.error_bound is not None}) or None,
                "bits_per_value": size.bits_per_value,
                "bytes": size.nbytes,
            }
        )
    total_bytes = sum(s.nbytes for s in sizes.values())
    total_values = sum(s.numel for s in sizes.values())
    return {
        **result,
        "policy": runtime.store.policy_yaml,
        "layers": layers,
        "bits_per_value": 8 * total_bytes / max(total_values, 1),
        "bytes": total_bytes,
        "expert_cache_bytes": runtime.budget_bytes,
        "expert_cache_slots": runtime.num_slots,
    }
