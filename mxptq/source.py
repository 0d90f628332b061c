"""Resolve `--model` (a local folder or a hub id) to a local folder of safetensors files, and
list the side files of that folder that the output gets a copy of."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint.paths import containment_root, inside, resolve_strict
from .checkpoint.safetensors_io import INDEX_NAME
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
                f"and has no cached copy; pass a local model folder (download it where the "
                f"network is: hf download {model} --local-dir DIR, then --model DIR)"
            ) from e
        raise MxptqError(f"--model {model}: not found locally or on the hub ({why})") from e


# Files a model folder holds that are not copied into the output: weights (written anew or not
# at all) and the configs the writer produces itself.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_REWRITTEN = ("config.json", INDEX_NAME, "hf_quant_config.json")


def side_files(folder: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """The non-weight files to copy into the output (tokenizer, generation config, chat
    template, ...) as (relative name, source path), and one note per file skipped under the
    containment rule (mxptq.checkpoint.paths): a link that leaves the folder, a dangling or
    looping link, a linked folder. Hidden top-level entries are not copied. Found before any
    heavy work, so a bad link is reported up front, not after the last shard."""
    root = containment_root(folder)
    keep: list[tuple[str, Path]] = []
    notes: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        top = here == folder
        for d in sorted(dirnames):
            if (top and d.startswith(".")) or not (here / d).is_symlink():
                continue
            notes.append(f"{(here / d).relative_to(folder)}: a linked folder, not copied")
        dirnames[:] = sorted(d for d in dirnames
                             if not (top and d.startswith(".")) and not (here / d).is_symlink())
        for name in sorted(filenames):
            p = here / name
            rel = str(p.relative_to(folder))
            if (top and name.startswith(".")) or name.endswith(WEIGHT_SUFFIXES) \
                    or rel in _REWRITTEN:
                continue
            if p.is_symlink():
                try:
                    real = resolve_strict(p)
                except MxptqError as e:
                    notes.append(f"{rel}: not copied ({e})")
                    continue
                if not inside(root, real) or not real.is_file():
                    notes.append(f"{rel}: a link to {real}, outside the model folder; not copied")
                    continue
            elif not p.is_file():
                continue  # sockets, fifos, devices
            keep.append((rel, p))
    return keep, notes
