"""`moeserve serve --replicas N`: the scale-out application on Ray Serve, run until SIGINT / SIGTERM.

    Front (ingress, 1, no CPU) ──► Replica × N (one engine each: ray_replica.py) ──► Board (1, no CPU)

Without --ray-address a local Ray cluster is started here (no dashboard, no token file) and stopped with
the server; with one, the application joins that cluster and only the application is deleted at the end.
On the first SIGINT / SIGTERM the application is deleted (each replica drains for the drain timeout), the
local cluster stops with every process it started, and the command exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

from moeserve.errors import MoeServeError

logger = logging.getLogger("moeserve.server")
APP_NAME = "moeserve"
_FRONT_MAX_ONGOING = 100_000  # every request passes the front; the replicas' limits are what bind


@dataclass(frozen=True)
class ScaleOut:
    replicas: int | None  # fixed count, or the autoscaler's initial count
    min_replicas: int | None
    max_replicas: int | None
    target_ongoing_requests: float | None
    ray_address: str | None  # None: start a local cluster
    cpus_per_replica: float
    gpus_per_replica: float
    prefix_blocks: int | None  # None: Serve's default routing (power of two choices)


class _Stop(Exception):
    pass


def require_ray() -> None:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise MoeServeError("--replicas runs on Ray Serve, which is not installed; pip install 'moeserve[ray]'.") from None


def serve_replicas(replica_spec, front_spec, scale: ScaleOut, host: str, port: int) -> None:
    """Deploy, serve until a signal, tear down. User errors (no cluster, a replica that cannot start) are
    MoeServeErrors."""
    require_ray()
    import ray
    from ray import serve

    stop = threading.Event()
    started_cluster = scale.ray_address is None
    _connect(ray, scale)
    ready = False

    def on_signal(signum, frame):
        stop.set()
        if not ready:
            raise _Stop  # still deploying: unwind serve.run

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        serve.start(http_options={"host": host, "port": port}, detached=not started_cluster)
        serve.run(application(replica_spec, front_spec, scale), name=APP_NAME, route_prefix="/")
        ready = True
        print(f"moeserve: serving on http://{host}:{port} with {_describe(scale)}", flush=True)
        stop.wait()
    except _Stop:
        pass
    except RuntimeError as exc:  # serve.run: a replica failed to start (its error is in the message)
        raise MoeServeError(f"the application did not start: {_first_line(exc)}") from None
    finally:
        _tear_down(ray, serve, started_cluster)


def _connect(ray, scale: ScaleOut) -> None:
    if scale.ray_address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray 2.60 writes a token file under ~
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        return
    try:
        ray.init(address=scale.ray_address, logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise MoeServeError(
            f"cannot join the Ray cluster at --ray-address {scale.ray_address!r} ({_first_line(exc)}); "
            f"start it with `ray start --head` or give its address."
        ) from None


def application(replica_spec, front_spec, scale: ScaleOut):
    """The bound Serve application: Front → Replica × N, both reading the Board."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from moeserve.server.ray_board import Board
    from moeserve.server.ray_front import Front
    from moeserve.server.ray_replica import Replica

    board = serve.deployment(Board, name="Board", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    engine = replica_spec.server
    replica_options = dict(
        name="Replica",
        max_ongoing_requests=_replica_capacity(replica_spec),
        graceful_shutdown_timeout_s=engine.drain_timeout + 5,
        health_check_period_s=2,
        ray_actor_options={
            "num_cpus": scale.cpus_per_replica,
            "num_gpus": scale.gpus_per_replica,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(replica_spec.torch_threads)}},
        },
    )
    if scale.min_replicas is not None or scale.max_replicas is not None:
        autoscaling = {
            "min_replicas": scale.min_replicas if scale.min_replicas is not None else 1,
            "max_replicas": scale.max_replicas if scale.max_replicas is not None else scale.replicas,
            "initial_replicas": scale.replicas,
        }
        if scale.target_ongoing_requests is not None:
            autoscaling["target_ongoing_requests"] = scale.target_ongoing_requests
        replica_options["autoscaling_config"] = autoscaling
    else:
        replica_options["num_replicas"] = scale.replicas
    if scale.prefix_blocks is not None:
        from moeserve.server.ray_router import PrefixAffinityRouter

        replica_options["request_router_config"] = RequestRouterConfig(request_router_class=PrefixAffinityRouter)
    replica = serve.deployment(Replica, **replica_options)
    front = serve.deployment(Front, name="Front", num_replicas=1, max_ongoing_requests=_FRONT_MAX_ONGOING,
                             ray_actor_options={"num_cpus": 0})
    board_app = board.bind()
    return front.bind(replica.bind(replica_spec, board_app), board_app, front_spec)


def _replica_capacity(replica_spec) -> int:
    """Requests a replica takes at once: its engine's own limit (running + waiting sequences), past which
    its app answers 429 as one process does."""
    return replica_spec.llm_options.get("max_num_seqs", 256) + replica_spec.server.max_waiting


def _tear_down(ray, serve, started_cluster: bool) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):  # a second signal cuts the drain short, not the clean-up
        signal.signal(signum, signal.default_int_handler)
    try:
        if ray.is_initialized():
            serve.delete(APP_NAME)
            if started_cluster:
                serve.shutdown()
    except KeyboardInterrupt:
        pass
    finally:
        ray.shutdown()


def _describe(scale: ScaleOut) -> str:
    if scale.min_replicas is not None or scale.max_replicas is not None:
        count = f"{scale.min_replicas or 1}-{scale.max_replicas} replicas (autoscaling)"
    else:
        count = f"{scale.replicas} replica{'s' if scale.replicas != 1 else ''}"
    routing = "prefix affinity" if scale.prefix_blocks is not None else "power of two choices"
    return f"{count}, routed by {routing}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
