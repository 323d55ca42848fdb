"""Every shell and Python example in README.md and docs/*.md runs, and prints what its comments say.

Conventions in the Markdown (the marker lines are HTML comments, invisible when rendered):
- a fence tagged `bash`/`sh` or `python` is an example; `text`, `yaml`, `json` and untagged blocks are not;
- `<!-- doc-test: skip: REASON -->` on the line before a fence: not run, reported as a skip with REASON;
- `<!-- doc-test: file NAME -->` before a block: its text is written to NAME for the examples after it;
- `# prints TEXT` at the end of a line: TEXT must appear in the example's output, in order.
The examples of one file run in order in one working directory, as a reader would run them. Those
that talk to a server on port 8000 get one `moeserve serve` on the embedded model, started once for
all of them (its port written in place of 8000).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from moeserve.assets import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
MARKER = re.compile(r"<!--\s*doc-test:\s*(skip|file)\s*:?\s*(.*?)\s*-->")
PRINTS = re.compile(r"#\s*prints\s+(.+?)\s*$")
SERVER = re.compile(r"(?:127\.0\.0\.1|localhost):8000")


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    code: str
    marker: tuple[str, str] | None

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    found, lines, i = [], doc.read_text().splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = MARKER.search(lines[i - 1]) if i > 0 else None
        found.append(Block(doc, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n",
                           marker.groups() if marker else None))
        i = end + 1
    return found


EXAMPLES = [b for doc in DOCS for b in blocks(doc) if b.lang in RUNNABLE or (b.marker and b.marker[0] == "file")]


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("doc-store-cache")
    made: dict[Path, Path] = {}

    def workdir(doc: Path) -> Path:
        if doc not in made:
            made[doc] = tmp_path_factory.mktemp(doc.stem)
        return made[doc]

    workdir.cache = cache
    return workdir


@pytest.fixture(scope="module")
def doc_server(tmp_path_factory):
    """Started on first use; the examples may switch its policy, so it is not the shared test server."""
    from serve_process import ServeProcess

    started: list[ServeProcess] = []

    def get() -> ServeProcess:
        if not started:
            log = tmp_path_factory.mktemp("doc-server") / "serve.log"
            started.append(ServeProcess(env={"MOESERVE_CACHE_DIR": str(log.parent / "cache")}, log=log).start())
        return started[0]

    yield get
    for server in started:
        server.stop()


def test_docs_reference_nothing_outside_the_repository():
    for doc in DOCS:
        text = doc.read_text()
        assert "../" not in text and "/work/" not in text, doc


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="the embedded default model is not installed")
@pytest.mark.parametrize("block", EXAMPLES, ids=[b.id for b in EXAMPLES])
def test_documented_example(block: Block, workdirs, doc_server):
    cwd = workdirs(block.doc)
    if block.marker and block.marker[0] == "skip":
        pytest.skip(block.marker[1])
    if block.marker and block.marker[0] == "file":
        (cwd / block.marker[1]).write_text(block.code)
        return
    code = block.code
    if SERVER.search(code):
        code = SERVER.sub(f"127.0.0.1:{doc_server().port}", code)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "MOESERVE_CACHE_DIR": str(workdirs.cache), "OMP_NUM_THREADS": "1"}
    if RUNNABLE[block.lang] == "bash":
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        command = [sys.executable, "-c", code]
    run = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{block.id} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    position = 0
    for expected in (m.group(1) for line in block.code.splitlines() if (m := PRINTS.search(line))):
        found = run.stdout.find(expected, position)
        assert found >= 0, f"{block.id}: expected {expected!r} in the output after position {position}:\n{run.stdout}"
        position = found + len(expected)
