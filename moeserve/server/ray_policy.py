"""The policy API of one replica in a scale-out application: the same routes as routes_admin.py, answered
for the whole application through the Board (ray_board.py).

    PUT  /v1/policy            validated and started here as in one process, then published: every other
                               replica switches at its next sync; the 202 carries the cluster job's id
    GET  /v1/policy/jobs/{id}  the cluster job: done once every live replica is done
    GET  /v1/policy            the committed policy (switched on every live replica); `generation` is the
                               application's count of switches, the same on every replica

These routes go in front of the app's own, inside its middleware (API key, body size, drain), so they are
guarded exactly as in one process. `ClusterPolicies` also keeps this replica in step: `catch_up` applies
the published policies before the replica serves (a replica Ray restarted starts on the startup policy),
and `reports` tells the Board how its switches are going.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from moeserve.server.errors import ApiError
from moeserve.server.policy_jobs import PolicyJob
from moeserve.server.routes_admin import describe_policy

_KEEP_TRACKED = 64


@dataclass
class TrackedJob:
    local: PolicyJob
    model: str


class ClusterPolicies:
    def __init__(self, app: FastAPI, board, replica_id: str):
        """`board`: a handle whose methods answer awaitables (a Ray Serve DeploymentHandle)."""
        self.server, self.board, self.replica_id = app.state.server, board, replica_id
        self.applied: dict[str, int] = {}  # variant → the published version this replica switched to
        self.tracked: dict[str, TrackedJob] = {}  # cluster job id → this replica's job for it
        router = APIRouter()
        router.add_api_route("/v1/policy", self.put_policy, methods=["PUT"])
        router.add_api_route("/v1/policy", self.get_policy, methods=["GET"])
        router.add_api_route("/v1/policy/jobs/{job_id}", self.get_job, methods=["GET"])
        app.router.routes[0:0] = router.routes  # matched before the one-process routes

    async def put_policy(self, request: Request, model: str | None = None):
        local = await self.server.jobs.submit(model, await request.body())
        version, job = await self.board.publish.remote(
            local.model, await request.body(), local.fingerprint, self.replica_id, local.to_dict()
        )
        self._track(job["id"], local)
        self.applied[local.model] = version
        return JSONResponse(job, status_code=202)

    async def get_job(self, job_id: str):
        job = await self.board.job.remote(job_id)
        if job is None:
            raise ApiError(404, f"there is no policy job {job_id!r}; PUT /v1/policy answers with the id.", "id")
        return job

    async def get_policy(self, model: str | None = None):
        variant = self.server.variants.lookup(model)
        committed = await self.board.committed_policy.remote(variant.name)
        if committed is None:  # never switched: every replica serves its startup policy
            return describe_policy(variant)
        version, described = committed
        return {**described, "generation": version}

    async def follow(self, desired: dict[str, dict]) -> list[PolicyJob]:
        """Start switching every variant whose published version this replica has not applied yet."""
        started = []
        for model, target in desired.items():
            if self.applied.get(model, 0) >= target["version"] or target["job"] in self.tracked:
                continue
            local = await self.server.jobs.submit(model, target["body"])
            self._track(target["job"], local)
            self.applied[model] = target["version"]
            started.append(local)
        return started

    async def catch_up(self, desired: dict[str, dict]) -> None:
        """Before this replica serves: switch to every published policy and wait for the switches."""
        for local in await self.follow(desired):
            while local.status not in ("done", "failed"):
                await asyncio.sleep(0.1)

    def reports(self) -> dict[str, dict]:
        """Each tracked job's state, with the policy it installed once done (for the committed GET)."""
        out = {}
        for job_id, tracked in self.tracked.items():
            report = tracked.local.to_dict()
            if tracked.local.status == "done":
                report["policy"] = describe_policy(self.server.variants.lookup(tracked.model))
            out[job_id] = report
        return out

    def _track(self, job_id: str, local: PolicyJob) -> None:
        self.tracked[job_id] = TrackedJob(local, local.model)
        while len(self.tracked) > _KEEP_TRACKED:
            self.tracked.pop(next(iter(self.tracked)))
