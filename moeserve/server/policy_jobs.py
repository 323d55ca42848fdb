"""PUT /v1/policy: validate a new policy now, re-encode the experts in the background, switch.

    event loop → worker thread           policy thread (one job at a time)         event loop
    load_policy + resolve ── 400 ──┐
    job queued, id returned (202)  └──► build_offload_runtime from the original  ──► AsyncEngine.switch:
                                        weights (llm.loaded.checkpoint): store,      new requests of the
                                        cache, provider; a disk-cached store is      variant get the new
                                        reused                                       provider; running ones
                                                                                     finish on the old one

In:  the policy text (YAML or JSON), the variant it replaces. The text is parsed and resolved on a worker
     thread, so the event loop (and /health) keeps answering while it is; its size, nesting and parse
     time are bounded (offload/yaml_locations.py), so a hostile text is refused in well under a second.
Out: a `PolicyJob` whose status GET /v1/policy/jobs/{id} shows: queued → encoding (with the share of
     expert tensors read so far) → done (switched) or failed (with the one-sentence reason).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from moeserve.llm import LLM
from moeserve.errors import MoeServeError
from moeserve.offload.policy import Policy, load_policy
from moeserve.offload.runtime import build_offload_runtime, is_compressed_dir
from moeserve.server.async_engine import AsyncEngine
from moeserve.server.errors import ApiError
from moeserve.server.variants import Variant, VariantTable

logger = logging.getLogger("moeserve.server")
_KEEP_JOBS = 64  # finished jobs remembered for GET


@dataclass
class PolicyJob:
    id: str
    model: str
    fingerprint: str
    status: str = "queued"  # queued | encoding | done | failed
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    tensors_read: int = 0
    tensors_total: int = 1
    generation: int | None = None  # the variant's policy generation once switched
    error: str | None = None

    def to_dict(self) -> dict:
        progress = 1.0 if self.status == "done" else min(self.tensors_read / max(self.tensors_total, 1), 0.99)
        return {
            "id": self.id,
            "object": "policy.job",
            "model": self.model,
            "status": self.status,
            "progress": round(progress, 4),
            "fingerprint": self.fingerprint,
            "generation": self.generation,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
        }


class _CountingCheckpoint:
    """The checkpoint, counting tensor reads: the job's progress while the store is encoded."""

    def __init__(self, checkpoint, job: PolicyJob):
        self._checkpoint, self._job = checkpoint, job

    def __getattr__(self, name):
        return getattr(self._checkpoint, name)

    def __contains__(self, name) -> bool:
        return name in self._checkpoint

    def get(self, name):
        self._job.tensors_read += 1
        return self._checkpoint.get(name)


class PolicyJobs:
    def __init__(self, llm: LLM, engine: AsyncEngine, variants: VariantTable):
        """New runtimes take the LLM's offloading options with the submitted policy."""
        self.llm, self.engine, self.variants = llm, engine, variants
        self.jobs: OrderedDict[str, PolicyJob] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeserve-policy")

    async def submit(self, model: str | None, body: bytes) -> PolicyJob:
        variant = self.variants.lookup(model)
        if is_compressed_dir(self.llm.model_dir):
            raise ApiError(
                400,
                f"{self.llm.model_dir} holds experts compressed by `moeserve compress`, so they cannot be re-encoded; "
                f"serve the original checkpoint to switch policies.",
            )
        policy, fingerprint = await asyncio.to_thread(self._check, body)
        job = PolicyJob(id=f"policyjob-{uuid.uuid4().hex[:16]}", model=variant.name, fingerprint=fingerprint)
        job.tensors_total = self._expected_reads()
        self.jobs[job.id] = job
        while len(self.jobs) > _KEEP_JOBS:
            self.jobs.popitem(last=False)
        self._executor.submit(self._build, job, variant, policy, asyncio.get_running_loop())
        return job

    def _check(self, body: bytes) -> tuple[Policy, str]:
        """Worker thread: the body as a policy that fits the model, and its fingerprint; else a 400."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the policy must be UTF-8 YAML or JSON text.") from None
        if not text.strip():
            raise ApiError(400, "the request body is empty; send a policy as YAML or JSON (see docs/policy.md).")
        # The newline keeps load_policy from reading a one-line body as a file path on the server.
        policy = load_policy(text + "\n")  # PolicyError (400) with the line and key
        config = self.llm.config
        resolved = policy.resolve(config.moe_layer_ids, config.num_layers, config.num_experts)
        return policy, resolved.fingerprint()

    def get(self, job_id: str) -> PolicyJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"there is no policy job {job_id!r}; PUT /v1/policy answers with the id.", "id")
        return job

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _expected_reads(self) -> int:
        """Tensors the store build reads: three per expert, or two stacked tensors per layer."""
        model, checkpoint, config = self.llm.model, self.llm.loaded.checkpoint, self.llm.config
        return sum(
            3 * config.num_experts if model.expert_tensor_names(layer, 0)[0] in checkpoint else 2
            for layer in config.moe_layer_ids
        )

    def _build(self, job: PolicyJob, variant: Variant, policy: Policy, loop: asyncio.AbstractEventLoop) -> None:
        """Policy thread: encode, then hand the runtime to the event loop for the switch."""
        job.status, job.started = "encoding", time.time()
        llm = self.llm
        try:
            counting = replace(llm.loaded, checkpoint=_CountingCheckpoint(llm.loaded.checkpoint, job))
            options = replace(llm.offload_options, policy=policy)
            runtime = build_offload_runtime(counting, options, llm.device, progress=False)
        except MoeServeError as exc:
            job.status, job.error, job.finished = "failed", str(exc), time.time()
            return
        except Exception:
            logger.exception("policy job %s failed", job.id)
            job.status, job.error, job.finished = (
                "failed",
                "internal error; the server log has the details.",
                time.time(),
            )
            return
        try:
            loop.call_soon_threadsafe(self._switch, job, variant, runtime)
        except RuntimeError:  # the server stopped meanwhile
            runtime.provider.close()

    def _switch(self, job: PolicyJob, variant: Variant, runtime) -> None:
        if self.engine.draining:
            runtime.provider.close()
            job.status, job.error, job.finished = "failed", "the server is shutting down.", time.time()
            return
        self.engine.switch(variant, runtime)
        job.status, job.finished, job.generation = "done", time.time(), variant.current.number
