"""Hostile policy texts (issue 26): a YAML alias bomb and bodies nested past any parser's stack.

`alias_bomb(7)` is the reference case: 497 bytes, 7 levels of 9 aliases each (a0 holds 9 values, a6
stands for 9**7, about 4.8 million), used where every key of a rule expands it. Before the parser
refused aliases it made a server unresponsive for minutes; 8 levels reached 12 GB of memory.
"""

from __future__ import annotations


def alias_bomb(levels: int, width: int = 9) -> str:
    anchors = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    anchors += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    top = f"*a{levels - 1}"
    return (
        "default: {codec: szp, mode: rel, error_bound: 0.001}\n"
        + "\n".join(anchors)
        + f"\nrules:\n  - {{layers: {top}, experts: {top}, projections: {top}, mode: abs, error_bound: 1}}\n"
    )


DEEP_NESTING = {"[ x 100000": "[" * 100_000, "{a:  x 50000": "{a: " * 50_000}
