"""The scale-out application's shared state, one Ray Serve deployment: which replicas are alive, their
metrics, and the policy every replica must serve per variant.

    replica ── sync every SYNC_SECONDS: who it is, its policy jobs, its /metrics text ──► Board
            ◄── the desired policies: per variant the latest PUT (version, body, cluster job id) ──┘
    front   ── /health, /metrics, GET /v1/policy/jobs/{id} ──► Board

A PUT /v1/policy lands on one replica, which validates it, starts its own switch and publishes it here;
every other replica sees the new version at its next sync and switches too, and a replica that Ray
restarts applies the latest version before it takes requests. So the policy is desired state, not a
broadcast that a replica could miss. A switch is *committed* once every live replica reports it done;
GET /v1/policy answers the committed policy, so it reads the same whichever replica answers.

A replica is live while it has synced within LIVE_SECONDS. The state lives in memory: if this deployment
itself is restarted, replicas re-register at their next sync, but published policies are forgotten.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

SYNC_SECONDS = 0.5
LIVE_SECONDS = 10.0  # a busy replica's sync can be late; a dead one drops out of /health after this


@dataclass
class ReplicaInfo:
    id: str
    pid: int
    node: str
    seen: float = field(default_factory=time.monotonic)
    metrics: bytes = b""


@dataclass
class ClusterJob:
    id: str
    model: str  # the variant's canonical served name
    version: int
    body: bytes
    fingerprint: str
    created: float = field(default_factory=time.time)
    reports: dict[str, dict] = field(default_factory=dict)  # replica id → its local job's to_dict()


class Board:
    def __init__(self):
        self.replicas: dict[str, ReplicaInfo] = {}
        self.jobs: dict[str, ClusterJob] = {}
        self.latest: dict[str, ClusterJob] = {}  # variant → the desired policy's job
        self.committed: dict[str, tuple[int, dict]] = {}  # variant → (version, policy description)

    def sync(self, replica_id: str, pid: int, node: str, reports: dict[str, dict], metrics: bytes) -> dict:
        """A replica's heartbeat and reports; answers the desired policies."""
        info = self.replicas.setdefault(replica_id, ReplicaInfo(replica_id, pid, node))
        info.seen, info.metrics = time.monotonic(), metrics
        for job_id, report in reports.items():
            job = self.jobs.get(job_id)
            if job is not None:
                job.reports[replica_id] = report
                self._commit_if_done(job)
        return self.desired()

    def desired(self) -> dict[str, dict]:
        return {model: {"version": j.version, "body": j.body, "job": j.id} for model, j in self.latest.items()}

    def publish(self, model: str, body: bytes, fingerprint: str, replica_id: str, report: dict) -> tuple[int, dict]:
        """A replica accepted a PUT for `model` and started switching: every replica follows. Answers the
        published version and the cluster job."""
        version = (self.latest[model].version if model in self.latest else 0) + 1
        job = ClusterJob(f"policyjob-{uuid.uuid4().hex[:16]}", model, version, body, fingerprint)
        job.reports[replica_id] = report
        self.jobs[job.id] = job
        self.latest[model] = job
        return version, self.job(job.id)

    def job(self, job_id: str) -> dict | None:
        """The cluster job as GET /v1/policy/jobs/{id} shows it: done once every live replica is done."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        self._commit_if_done(job)
        live = self.live_ids()
        reports = {r: job.reports.get(r, {"status": "queued", "progress": 0.0}) for r in live}
        statuses = [r["status"] for r in reports.values()]
        failed = [r for r in reports.values() if r["status"] == "failed"]
        if failed:
            status = "failed"
        elif statuses and all(s == "done" for s in statuses):
            status = "done"
        elif any(s in ("encoding", "done") for s in statuses):
            status = "encoding"
        else:
            status = "queued"
        progress = sum(r.get("progress", 0.0) for r in reports.values()) / max(len(reports), 1)
        return {
            "id": job.id,
            "object": "policy.job",
            "model": job.model,
            "status": status,
            "progress": round(1.0 if status == "done" else progress, 4),
            "fingerprint": job.fingerprint,
            "generation": job.version if status == "done" else None,
            "created": job.created,
            "error": failed[0].get("error") if failed else None,
            "replicas": {r: report["status"] for r, report in reports.items()},
        }

    def committed_policy(self, model: str) -> tuple[int, dict] | None:
        return self.committed.get(model)

    def live(self) -> list[dict]:
        now = time.monotonic()
        return [
            {"id": r.id, "pid": r.pid, "node": r.node, "last_sync_seconds_ago": round(now - r.seen, 2)}
            for r in self.replicas.values()
            if now - r.seen < LIVE_SECONDS
        ]

    def live_ids(self) -> list[str]:
        return [r["id"] for r in self.live()]

    def metrics(self) -> dict[str, bytes]:
        live = set(self.live_ids())
        return {r.id: r.metrics for r in self.replicas.values() if r.id in live}

    def _commit_if_done(self, job: ClusterJob) -> None:
        live = self.live_ids()
        if not live or any(job.reports.get(r, {}).get("status") != "done" for r in live):
            return
        previous = self.committed.get(job.model)
        described = next((r["policy"] for r in job.reports.values() if r.get("policy")), None)
        if described is not None and (previous is None or previous[0] < job.version):
            self.committed[job.model] = (job.version, described)
