"""The scale-out options of `moeserve serve` (--replicas and the rest), checked before Ray starts.

Without --replicas, --min-replicas or --max-replicas the server is one process as before. With them, the
command line's model and policies are resolved here, where the files are (model path made absolute,
policy files read and checked), so that a mistake is one `error:` line before anything starts and the
replicas receive data rather than paths into this machine's working directory.
"""

from __future__ import annotations

import argparse

from moeserve.errors import MoeServeError

ROUTINGS = ("power-of-two", "prefix-affinity")


def _count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number of replicas; give e.g. 2")
    return int(value)


def _share(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of devices or cores (0 or more, e.g. 0.5)")
    return number


def _positive(value: str) -> float:
    number = _share(value)
    if number == 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be above 0")
    return number


def _blocks(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of KV blocks between 1 and 64")
    return int(value)


def add_scale_out_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale-out on Ray Serve (docs/scale-out.md)")
    group.add_argument("--replicas", type=_count, default=None, help="serve N replicas, each one engine, on Ray Serve")
    group.add_argument("--ray-address", default=None,
                       help="join this Ray cluster ('auto', or HOST:PORT); default: start a local one for the server")
    group.add_argument("--cpus-per-replica", type=_share, default=1.0,
                       help="CPU cores Ray reserves per replica; its torch threads (default 1)")
    group.add_argument("--gpus-per-replica", type=_share, default=None,
                       help="GPUs per replica (default: 1 when the device is a GPU, else 0)")
    group.add_argument("--min-replicas", type=_count, default=None, help="autoscaling: the fewest replicas")
    group.add_argument("--max-replicas", type=_count, default=None, help="autoscaling: the most replicas")
    group.add_argument("--target-ongoing-requests", type=_positive, default=None,
                       help="autoscaling: requests per replica the autoscaler aims for (Serve's default 2)")
    group.add_argument("--routing", choices=ROUTINGS, default="power-of-two",
                       help="power-of-two: the shorter queue of two random replicas; prefix-affinity: prompts "
                            "sharing their first KV blocks go to the same replica (default power-of-two)")
    group.add_argument("--prefix-blocks", type=_blocks, default=2,
                       help="prefix-affinity: how many 16-token blocks at the start of a prompt pick its replica")


def scale_out_options(args: argparse.Namespace):
    """A ScaleOut for the Ray Serve application, or None for one process; inconsistent options are errors."""
    autoscaling = args.min_replicas is not None or args.max_replicas is not None
    if args.replicas is None and not autoscaling:
        for option, given in (("--ray-address", args.ray_address is not None),
                              ("--gpus-per-replica", args.gpus_per_replica is not None),
                              ("--target-ongoing-requests", args.target_ongoing_requests is not None),
                              ("--routing", args.routing != "power-of-two")):
            if given:
                raise MoeServeError(f"{option} applies to replicas on Ray Serve; add --replicas N (or --max-replicas N).")
        return None
    if autoscaling:
        if args.max_replicas is None:
            raise MoeServeError("autoscaling needs --max-replicas N (the most replicas it may start).")
        low = args.min_replicas if args.min_replicas is not None else 1
        if low > args.max_replicas:
            raise MoeServeError(f"--min-replicas {low} is above --max-replicas {args.max_replicas}; swap them.")
        if args.replicas is not None and not low <= args.replicas <= args.max_replicas:
            raise MoeServeError(
                f"--replicas {args.replicas} is outside --min-replicas {low} .. --max-replicas {args.max_replicas}; "
                f"it is the autoscaler's starting count."
            )
    elif args.target_ongoing_requests is not None:
        raise MoeServeError("--target-ongoing-requests steers the autoscaler; add --max-replicas N.")
    from moeserve.server.ray_launch import ScaleOut

    return ScaleOut(
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        ray_address=args.ray_address,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica if args.gpus_per_replica is not None else _default_gpus(args.device),
        prefix_blocks=args.prefix_blocks if args.routing == "prefix-affinity" else None,
    )


def _default_gpus(device: str | None) -> float:
    if device is not None:
        return 1.0 if device.startswith("cuda") else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def serve_scaled_out(llm_options: dict, config, scale, host: str, port: int) -> None:
    """Resolve the model and policies here, then run the application (ray_launch.py)."""
    from moeserve.server.ray_launch import require_ray, serve_replicas

    require_ray()
    serve_replicas(*application_specs(llm_options, config, scale), scale, host, port)


def application_specs(llm_options: dict, config, scale) -> tuple:
    """(ReplicaSpec, FrontSpec): the model path absolute, the policies loaded (a mistake is an error here)."""
    from dataclasses import replace

    from moeserve.loader import resolve_model_dir
    from moeserve.offload.policy import load_policy
    from moeserve.server.ray_front import FrontSpec
    from moeserve.server.ray_replica import ReplicaSpec

    model = str(resolve_model_dir(llm_options["model"]).resolve()) if llm_options["model"] is not None else None
    policy = llm_options["policy"]
    llm_options = {**llm_options, "model": model, "policy": load_policy(policy) if policy is not None else None}
    config = replace(config, policies={name: load_policy(path) for name, path in config.policies.items()})
    threads = max(1, int(scale.cpus_per_replica))
    return ReplicaSpec(llm_options, config, threads), FrontSpec(model, scale.prefix_blocks, config.max_body_bytes)
