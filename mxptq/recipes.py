"""Recipes: YAML files whose keys are the `mxptq quantize` flags (without dashes); values given
on the command line win over the recipe's, which win over the built-in defaults."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import MxptqError

DEFAULTS: dict = {
    "format": "nvfp4",
    "scale": "search",
    "block-size": None,
    "dialect": None,  # compressed-tensors where it can express the format, else native
    "ignore": [],
    "quantize-lm-head": False,
    "fused-set": [],  # replaces the built-in fused-set table (docs/quantize.md)
    "device": "auto",
    "global-search": False,  # search each tensor's / fused set's global scale
    "model": None,
    "out": None,
    # calibration (docs/calibration.md)
    "calib": None,
    "calib-samples": 128,
    "calib-seqlen": 2048,
    "calib-batch": 8,  # windows per forward pass
    "seed": 0,
    "importance": "none",  # none | diag | hessian
    "algo": "rtn",
    "gptq-scales": "lazy",
    "damp": 0.01,
    "act-order": False,
    "scheme": "w4a16",
}
KEYS = tuple(DEFAULTS)


def load_recipe(path: Path) -> dict:
    """Read and check a recipe; keys may use dashes or underscores."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise MxptqError(f"--recipe {path}: cannot read ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise MxptqError(f"--recipe {path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise MxptqError(f"--recipe {path}: expected a mapping of flag names to values")
    out = {}
    for k, v in data.items():
        key = str(k).replace("_", "-")
        if key not in KEYS:
            raise MxptqError(f"--recipe {path}: unknown key {k!r} (known: {', '.join(KEYS)})")
        if key in ("ignore", "fused-set") and isinstance(v, str):
            v = [v]
        _check_type(path, k, key, v)
        out[key] = v
    return out


def _check_type(path: Path, k, key: str, v) -> None:
    """Numbers and switches must be what the flag takes (a string there would fail deep in
    the run); the type is the default's (block-size: an integer or null)."""
    d = DEFAULTS[key]
    if isinstance(d, bool):
        ok, what = isinstance(v, bool), "true or false"
    elif isinstance(d, int) or key == "block-size":
        ok = (isinstance(v, int) and not isinstance(v, bool)) or (v is None and d is None)
        what = "an integer"
    elif isinstance(d, float):
        ok, what = isinstance(v, int | float) and not isinstance(v, bool), "a number"
    else:
        return
    if not ok:
        raise MxptqError(f"--recipe {path}: {k} must be {what}, got {v!r}")


def merge(recipe: dict, cli: dict) -> dict:
    """Defaults, then the recipe, then flags given on the command line (None = not given)."""
    opts = dict(DEFAULTS)
    opts.update(recipe)
    for k, v in cli.items():
        if v is not None and not (k in ("ignore", "fused-set") and not v):
            opts[k] = v
    return opts
