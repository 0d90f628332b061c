"""Resolve `--model` (a local folder or a hub id) to a local folder of safetensors files."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MxptqError

# What a quantization run needs from a hub repository: weights, configs, tokenizer files.
HUB_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "*.py",
]


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not model.startswith((".", "/", "~"))
        and not any(p in (".", "..") for p in parts)
    )


def resolve_model(model: str) -> Path:
    """A local folder as is; otherwise a hub id through huggingface_hub (cache first). A GGUF
    file (or a folder holding one) becomes its converted folder, and a folder that a GGUF load
    left marked `quant_method: gguf` a dense view of it (mxptq.gguf_source)."""
    from .gguf_source import dense_view, find_gguf, gguf_folder

    path = Path(model).expanduser()
    gguf = find_gguf(path)
    if gguf is not None:
        return gguf_folder(gguf)
    if path.is_dir():
        return dense_view(path.resolve())
    if path.exists():
        raise MxptqError(f"--model {model}: is a file, expected a model folder, a .gguf file "
                         "or a hub id")
    if not _looks_like_hub_id(model):
        raise MxptqError(f"--model {model}: no such folder (and not a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise MxptqError(f"--model {model}: not a folder, and huggingface_hub is missing") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(
            snapshot_download(model, allow_patterns=HUB_PATTERNS, local_files_only=offline)
        )
    except Exception as e:  # the hub client raises many types; all mean "not available"
        why = type(e).__name__
        if offline or "offline" in str(e).lower() or "connect" in str(e).lower() or why in (
            "LocalEntryNotFoundError",
            "ConnectionError",
        ):
            raise MxptqError(
                f"--model {model}: not a local folder, and the hub is not reachable (offline) "
                "and has no cached copy; pass a local model folder"
            ) from e
        raise MxptqError(f"--model {model}: not found locally or on the hub ({why})") from e
