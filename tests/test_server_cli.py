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
