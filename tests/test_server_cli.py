"""`moeserve serve` options: repeated `--policy NAME=FILE` next to the single `--policy FILE` of the other commands."""

from __future__ import annotations

import pytest

from moeserve.cli import _split_policies, build_parser
from moeserve.errors import MoeServeError


def test_serve_takes_named_policies_and_one_unnamed():
    args = build_parser().parse_args(
        ["serve", "--policy", "tight=t.yaml", "--policy", "base.yaml", "--policy", "loose=dir/l=1.yaml", "--port", "0"]
    )
    assert _split_policies(args.policy) == ("base.yaml", {"tight": "t.yaml", "loose": "dir/l=1.yaml"})
    assert _split_policies(["./a=b.yaml"]) == ("./a=b.yaml", {})  # not a name: a path with '='
    assert build_parser().parse_args(["generate", "--policy", "p.yaml", "x"]).policy == "p.yaml"


@pytest.mark.parametrize("values", [["a=x.yaml", "a=y.yaml"], ["x.yaml", "y.yaml"]])
def test_ambiguous_policies_are_refused(values):
    with pytest.raises(MoeServeError, match="twice"):
        _split_policies(values)


def test_serve_command_end_to_end(checkpoint_factory, tmp_path):
    """The real command: named variants, API key, one request each, then SIGTERM shuts it down cleanly."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    policy = tmp_path / "lossy.yaml"
    policy.write_text("default: {codec: szp, mode: rel, error_bound: 1.0e-2}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "moeserve.cli",
        "serve",
        "--model",
        str(directory),
        "--port",
        str(port),
        "--policy",
        f"lossy={policy}",
        "--served-model-name",
        "tiny",
        "--expert-cache",
        "50%",
    ]
    env = dict(os.environ, MOESERVE_CACHE_DIR=str(tmp_path / "cache"), MOESERVE_API_KEY="k", OMP_NUM_THREADS="1")
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        headers = {"Authorization": "Bearer k"}
        names = [m["id"] for m in httpx.get(f"{url}/v1/models", headers=headers).json()["data"]]
        assert names == ["tiny", "tiny@lossy"]  # no unnamed policy: tiny is the first named variant
        for name in names:
            body = {"model": name, "prompt": "hello", "max_tokens": 3}
            assert httpx.post(f"{url}/v1/completions", json=body, headers=headers).status_code == 200
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}).status_code == 401
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
    assert server.returncode == 0, output  # a drained shutdown is a clean exit, not death by the signal
    assert "Application shutdown complete" in output
