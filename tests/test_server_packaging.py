"""pyproject.toml lists its packages (server/ installs as moeserve.server, which package discovery
cannot map), so a committed subpackage missing from the list would vanish from wheels."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_committed_subpackage_is_listed():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "moeserve", "server"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {directory: package for package, directory in setuptools["package-dir"].items()}
    needed = set()
    for path in tracked:
        if path.endswith(".py"):
            directory = str(Path(path).parent)
            needed.add(mapped.get(directory, directory.replace("/", ".")))
    missing = sorted(needed - set(setuptools["packages"]))
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"


def test_server_package_maps_to_the_top_level_directory():
    import moeserve
    import moeserve.server

    if ROOT not in Path(moeserve.__file__).resolve().parents:
        pytest.skip("moeserve is installed from a wheel here, not from this checkout")
    assert Path(moeserve.server.__file__).resolve().parent == ROOT / "server"
