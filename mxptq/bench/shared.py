"""Where the benchmarks that measure on the developers' optional assets (stories260K,
TinyStories and WikiText text) find them: $MXPTQ_SHARED/assets, by default ../shared/assets
beside the repository. A clone without them gets one line saying what is missing."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def assets_dir() -> Path:
    root = os.environ.get("MXPTQ_SHARED") or Path(__file__).resolve().parents[3] / "shared"
    return Path(root) / "assets"


def require(*paths: Path) -> None:
    """Exit with status 2 and one line when any of `paths` is missing."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"error: this benchmark reads the shared assets, and {missing[0]} is missing; "
              "set MXPTQ_SHARED to the folder that holds assets/ (default: ../shared beside "
              "the repository)", file=sys.stderr)
        sys.exit(2)
