"""The Dockerfile names things that exist: its entrypoint, the extra it installs, the health route, the port.

No Docker is needed: the Dockerfile is parsed as text and checked against pyproject.toml, the CLI's own
argument parser and the FastAPI app's routes, so a rename on either side fails here.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def only(keyword: str) -> str:
    found = [rest for kw, rest in instructions() if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} in the Dockerfile, found {len(found)}"
    return found[0]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def entrypoint() -> list[str]:
    return json.loads(only("ENTRYPOINT"))  # exec form: a JSON array, so signals reach the server


def exposed_port() -> int:
    return int(only("EXPOSE").split("/")[0])


def installed_extras() -> list[str]:
    installs = [rest for kw, rest in instructions() if kw == "RUN" and "pip install" in rest]
    named = []
    for command in installs:
        for word in shlex.split(command):
            match = re.fullmatch(r"(?:\.|moeserve)\[([\w,-]+)\]", word)
            if match:
                named += match.group(1).split(",")
    return named


def test_base_image_is_a_cuda_runtime_of_the_cupy_extra_it_installs():
    image = only("FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", image)
    assert match, image
    gpu = [extra for extra in installed_extras() if extra.startswith("gpu-cuda")]
    assert gpu == [f"gpu-cuda{match.group(1)}"], (image, gpu)


def test_entrypoint_is_the_console_script_and_its_serve_command():
    from moeserve.cli import build_parser

    script, command, *_ = entrypoint()
    assert script in pyproject()["project"]["scripts"]
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    assert command in subcommands
    # What `docker run IMAGE --model /models/NAME` runs must parse, and listen on every interface.
    args = parser.parse_args(entrypoint()[1:] + ["--model", "/models/NAME"])
    assert args.host == "0.0.0.0" and args.model == "/models/NAME"
    assert args.port == exposed_port()


def test_installed_extras_exist_in_pyproject():
    extras = pyproject()["project"]["optional-dependencies"]
    named = installed_extras()
    assert any(extra.startswith("gpu-cuda") for extra in named), "the image must install a gpu-cuda* extra"
    for extra in named:
        assert extra in extras


def test_gpu_extras_pair_each_cuda_major_with_its_cupy():
    extras = pyproject()["project"]["optional-dependencies"]
    for major in ("12", "13"):
        assert [Requirement(r).name for r in extras[f"gpu-cuda{major}"]] == [f"cupy-cuda{major}x"]


def test_image_torch_is_one_version_inside_the_pyproject_range():
    wanted = next(Requirement(d) for d in pyproject()["project"]["dependencies"] if d.startswith("torch"))
    assert not any(op == "==" for op in (spec.operator for spec in wanted.specifier)), "torch must be a range"
    pins = [Requirement(w) for kw, rest in instructions() if kw == "RUN" for w in shlex.split(rest) if w.startswith("torch==")]
    assert len(pins) == 1 and wanted.specifier.contains(next(iter(pins[0].specifier)).version), pins


@pytest.fixture(scope="module")
def app(checkpoint_factory):
    from moeserve import LLM
    from moeserve.server import create_app

    directory, _ = checkpoint_factory("qwen3_moe")
    return create_app(LLM(str(directory), device="cpu", progress=False))


def test_healthcheck_probes_a_get_route_of_the_app_on_the_exposed_port(app):
    healthcheck = only("HEALTHCHECK")
    url = re.search(r"https?://[^'\"\s]+", healthcheck).group(0)
    parsed = urlparse(url)
    assert parsed.port == exposed_port()
    assert "get" in app.openapi()["paths"].get(parsed.path, {}), f"{parsed.path} is not a GET route of the app"
    assert "python" in healthcheck and "urllib" in healthcheck  # curl is not in the image
    with TestClient(app) as client:  # runs the lifespan, so the engine's step thread is up as in the image
        assert client.get(parsed.path).status_code == 200
