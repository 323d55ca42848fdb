"""The scale-out application as a Ray Serve application builder, for deployments that Serve itself starts
(`serve run`, `serve deploy`, a KubeRay RayService): `moeserve.server.ray_app:build` with the arguments of
`moeserve serve` as one string.

    serve run moeserve.server.ray_app:build argv="--replicas 2 --policy lossy=/etc/moeserve/lossy.yaml"

The cluster, host and port are Serve's to choose here: --ray-address, --host and --port are ignored.
"""

from __future__ import annotations

import shlex

from moeserve.errors import MoeServeError


def build(args: dict):
    from moeserve.cli import _llm_options, _serve_options, build_parser
    from moeserve.server.ray_launch import application
    from moeserve.server.scale_out_cli import application_specs, scale_out_options

    parsed = build_parser().parse_args(["serve", *shlex.split(str(args.get("argv", "")))])
    scale = scale_out_options(parsed)
    if scale is None:
        raise MoeServeError("the application needs --replicas N (or --max-replicas N) in argv.")
    engine_options, config = _serve_options(parsed)
    return application(*application_specs(_llm_options(parsed, **engine_options), config, scale), scale)
