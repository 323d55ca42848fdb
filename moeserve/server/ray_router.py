"""Prefix affinity: requests whose prompts start with the same blocks of tokens go to the same replica,
whose prefix cache then holds those blocks.

The front passes each request's `prefix_key` (routing_key.py: a hash of its prompt's first KV blocks of
token ids; None for a prompt under one block). The router ranks
the live replicas by rendezvous hashing of (key, replica id): a key keeps its replica while replicas come
and go, and only the keys of a replica that left move. The first-ranked replica is taken unless it is
overloaded, that is its queue is IMBALANCE requests longer than the shortest known queue; then, and for
a request without a key, it is Serve's default: the shorter queue of two random replicas. A replica at its
`max_ongoing_requests` refuses the request and Serve tries the next rank, so affinity never queues
without bound.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

IMBALANCE = 8


def rank_by_affinity(key: str, replica_ids: list[str]) -> list[str]:
    """Rendezvous (highest random weight) order of the replicas for `key`."""

    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{key}/{replica_id}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class PrefixAffinityRouter(RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_request.kwargs.get("prefix_key") if pending_request is not None else None
        two_random = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        if key is None:
            return [two_random]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        chosen = by_id[rank_by_affinity(key, list(by_id))[0]]
        if await self._overloaded(chosen, candidate_replicas):
            return [two_random]
        return [[chosen], two_random]

    async def _overloaded(self, chosen: RunningReplica, replicas: list[RunningReplica]) -> bool:
        """Queue lengths from Serve's cache where it has them, else probed (as the default router does)."""
        lengths = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) for r in replicas}
        unknown = [r for r in replicas if lengths[r.replica_id] is None]
        if unknown:
            for replica, length in await self._probe_queue_lens(unknown, 0):
                lengths[replica.replica_id] = length
        known = [q for q in lengths.values() if q is not None]
        mine = lengths[chosen.replica_id]
        return mine is not None and mine - min(known) >= IMBALANCE
