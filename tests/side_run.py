"""Whole test modules run in a subprocess beside the session, each test still reported under its own name.

Why: the session keeps about one core busy (measured on a 2-core machine with cold caches: 117% CPU over a
632 s run), and the modules that compile decode steps through inductor spend most of their time in a
single-threaded C++ compile (~10 s per step shape on a fresh machine). A module that sets
`RUN_BESIDE_THE_SESSION = True` runs on the other core from the start of the session instead.

Data flow:
- The conftest's collection hook calls `start(session)`. When the session collected tests outside such modules
  too (a run of the whole suite), their tests go to one `EarlyRun` (tests/early_runs.py), and each of their items
  in `session.items` is replaced by a `SideResult` of the same node id, moved to the end of the session.
- In the subprocess, MOESERVE_SIDE_RESULTS names a file; `record` appends each test phase's outcome there.
- `SideResult.runtest` waits for the subprocess, then passes, fails with the subprocess's report, or skips with
  its reason. A test the subprocess did not finish (a crash) fails, with the subprocess's exit status and output.
A session that collected only such modules (`pytest tests/test_compiled_decode.py`) runs them as usual.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from early_runs import IN_EARLY_RUN_ENV, EarlyRun

RESULTS_ENV = "MOESERVE_SIDE_RESULTS"
MARK = "RUN_BESIDE_THE_SESSION"

_run: dict[str, object] = {}  # "process": EarlyRun, "results": path, "outcomes": nodeid -> list of phase records


def _beside(item) -> bool:
    module = getattr(item, "module", None)
    return module is not None and getattr(module, MARK, False)


def start(session) -> None:
    """Hand the items of modules marked `RUN_BESIDE_THE_SESSION` to a subprocess, when other tests run too."""
    if IN_EARLY_RUN_ENV in os.environ or session.config.option.collectonly:
        return
    beside = [item for item in session.items if _beside(item)]
    if not beside or len(beside) == len(session.items):
        return
    results = Path(tempfile.mkdtemp(prefix="moeserve-side-run-")) / "results.jsonl"
    process = EarlyRun([item.nodeid for item in beside], {RESULTS_ENV: str(results)})
    process.start()
    _run.update(process=process, results=results)
    # last: the first of them waits for the whole side run, which the session's other tests overlap
    session.items[:] = [item for item in session.items if not _beside(item)] + [
        SideResult.from_parent(item.parent, name=item.name, original=item) for item in beside]


def stop() -> None:
    """At the session's end: end the subprocess if no test waited for it, and remove its results."""
    process = _run.get("process")
    if process is not None:
        process.stop()
        shutil.rmtree(_run["results"].parent, ignore_errors=True)


def record(report) -> None:
    """In the subprocess: append one phase's outcome of one test to the results file."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    entry = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome}
    if hasattr(report, "wasxfail"):  # an expected failure (skipped) or an unexpected pass (passed)
        entry["xfail"] = report.wasxfail
    if report.skipped and isinstance(report.longrepr, tuple):
        entry["text"] = report.longrepr[2]  # (file, line, "Skipped: reason")
    elif not report.passed:
        entry["text"] = report.longreprtext
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(entry) + "\n")


def _outcomes() -> dict[str, list[dict]]:
    if "outcomes" not in _run:
        completed = _run["process"].result()
        _run["completed"] = completed
        outcomes: dict[str, list[dict]] = {}
        results: Path = _run["results"]
        if results.is_file():
            for line in results.read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                outcomes.setdefault(entry["nodeid"], []).append(entry)
        _run["outcomes"] = outcomes
    return _run["outcomes"]


class SideRunFailure(Exception):
    """A test that failed (or did not finish) in the side run; its text is the subprocess's report."""


class SideResult(pytest.Item):
    """Stands for a test that ran in the side run: its outcome there is its outcome here."""

    def __init__(self, *, original, **kwargs):
        super().__init__(**kwargs)
        self.original = original
        self.own_markers = list(original.own_markers)

    def runtest(self) -> None:
        phases = _outcomes().get(self.nodeid, [])
        if not any(phase["when"] == "teardown" for phase in phases):  # every test that ends reports a teardown
            completed = _run["completed"]
            # a crash's stderr starts with what failed and where ("Fatal Python error: ...", the threads' stacks)
            # and ends with a list of the loaded extension modules
            stderr = completed.stderr if len(completed.stderr) <= 8000 else (
                f"{completed.stderr[:6000]}\n[...]\n{completed.stderr[-2000:]}")
            raise SideRunFailure(f"the side run (exit status {completed.returncode}) did not finish this test; "
                                 f"its output ends:\n{completed.stdout[-2000:]}\nits stderr:\n{stderr}")
        failed = [phase for phase in phases if phase["outcome"] == "failed"]
        if failed:
            raise SideRunFailure("\n".join(f"[side run, {phase['when']}]\n{phase['text']}" for phase in failed))
        skipped = [phase for phase in phases if phase["outcome"] == "skipped"]
        if skipped and "xfail" in skipped[0]:
            pytest.xfail(skipped[0]["xfail"])
        if skipped:
            reason = skipped[0].get("text", "skipped in the side run").removeprefix("Skipped: ")
            raise pytest.skip.Exception(reason, _use_item_location=True)  # reported at the test, not here

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, SideRunFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.original.reportinfo()
