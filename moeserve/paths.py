"""Where moeserve keeps what it builds once and reuses across processes (compressed expert stores, its C++ ops).

The root is $MOESERVE_CACHE_DIR, by default ~/.cache/moeserve; each user of it keeps a subdirectory of its own.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$MOESERVE_CACHE_DIR, or ~/.cache/moeserve; read on every call, so a process (or a test) may change it."""
    return Path(os.environ.get("MOESERVE_CACHE_DIR", Path.home() / ".cache" / "moeserve"))
