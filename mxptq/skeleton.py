"""A meta-device model built from config.json: which modules are Linear layers, and how fused
3-D MoE expert tensors are laid out. Nothing is allocated and no weight is read.

Building it imports transformers' modeling code, the largest part of `mxptq quantize`'s
start-up, so the result is cached on disk (`load_skeleton`), keyed by the config's bytes, the
transformers version and this module's source: a later run on the same architecture (another
format, a resume, a retry) plans without importing transformers at all.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import MxptqError


class ModelClassUnavailable(MxptqError):
    """transformers cannot build the model (unknown model type, remote code, a newer
    architecture than the installed version): the plan then comes from tensor names."""


@dataclass
class Skeleton:
    """Linear module names (model naming), fused-expert parameters with their layout, and the
    base-model prefix used to match checkpoint names that carry or lack it."""

    linears: set[str] = field(default_factory=set)
    experts: dict[str, str] = field(default_factory=dict)  # "…experts.gate_up_proj" -> layout
    expert_modules: set[str] = field(default_factory=set)
    prefix: str = ""
    lm_head: set[str] = field(default_factory=set)
    model_class: str = ""

    def match_linear(self, module: str) -> str | None:
        """The skeleton Linear a checkpoint module path names, allowing a missing or extra
        base-model prefix (e.g. `bert.` or `model.`)."""
        for cand in self._candidates(module):
            if cand in self.linears:
                return cand
        return None

    def match_expert_param(self, name: str) -> str | None:
        for cand in self._candidates(name):
            if cand in self.experts:
                return cand
        return None

    def _candidates(self, name: str) -> list[str]:
        out = [name]
        if self.prefix:
            if name.startswith(self.prefix + "."):
                out.append(name[len(self.prefix) + 1 :])
            else:
                out.append(f"{self.prefix}.{name}")
        return out


def expert_layout(module, pname: str) -> str | None:
    """"out_in" when the forward computes linear(x, W[e]) (W[e] is [out, in]), "in_out" when it
    computes x @ W[e]; None when the code does not say (the plan then refuses the tensor)."""
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return None
    p = re.escape(pname)
    if re.search(rf"linear\(\s*[^,]+,\s*self\.{p}\[", src):
        return "out_in"
    if re.search(rf"@\s*self\.{p}\b", src) or re.search(rf"(bmm|matmul)\([^)]*self\.{p}\b", src):
        return "in_out"
    return None


def _why(version: str, raw: dict, e: Exception) -> str:
    """One line on why transformers cannot read this config."""
    msg, mt = str(e), raw.get("model_type")
    if "trust_remote_code" in msg:
        return f"model type {mt!r} needs remote code, which mxptq does not run"
    if "does not recognize" in msg or isinstance(e, KeyError):
        return f"transformers {version} does not know model type {mt!r}"
    first = (msg.splitlines() or [type(e).__name__])[0][:160]
    return f"transformers {version} cannot read the config of model type {mt!r} ({first})"


def build_skeleton(model_dir: Path) -> Skeleton:
    """Instantiate the model class from config.json on the meta device and inspect it."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise MxptqError(f"{model_dir}: no config.json")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise MxptqError(f"{cfg_path}: cannot read the model config ({e})") from e
    try:
        # never run, nor prompt about, a repository's own code
        config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError/KeyError/OSError for bad configs
        raise ModelClassUnavailable(_why(transformers.__version__, raw, e)) from e
    classes = []
    for arch in raw.get("architectures") or []:
        if hasattr(transformers, arch):
            classes.append(getattr(transformers, arch))
    model = None
    with init_empty_weights(include_buffers=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cls in classes:
            try:
                model = cls._from_config(config)
                break
            except Exception:  # any failure: try the next way to build it
                model = None
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
            if model is not None:
                break
            try:
                model = auto.from_config(config)
            except Exception:
                model = None
    if model is None:
        raise ModelClassUnavailable(
            f"transformers {transformers.__version__} cannot build model type "
            f"{raw.get('model_type')!r}"
        )
    prefix = getattr(model, "base_model_prefix", "") or ""
    sk = Skeleton(prefix=prefix, model_class=type(model).__name__)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            sk.linears.add(name)
            if mod is out_emb or name.split(".")[-1] == "lm_head":
                sk.lm_head.add(name)
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() == 3:
                sk.experts[f"{name}.{pname}"] = expert_layout(mod, pname) or "unknown"
                sk.expert_modules.add(name)
    return sk


def cache_dir() -> Path | None:
    """Where skeletons are cached: $MXPTQ_CACHE_DIR, else $XDG_CACHE_HOME/mxptq, else
    ~/.cache/mxptq; None when MXPTQ_NO_CACHE is set."""
    if os.environ.get("MXPTQ_NO_CACHE"):
        return None
    if os.environ.get("MXPTQ_CACHE_DIR"):
        return Path(os.environ["MXPTQ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mxptq"


def _cache_key(config: bytes) -> str:
    from importlib.metadata import version

    h = hashlib.sha256(config)
    h.update(version("transformers").encode())
    h.update(Path(__file__).read_bytes())  # a change in how skeletons are built invalidates
    return h.hexdigest()[:32]


def load_skeleton(model_dir: Path) -> Skeleton:
    """build_skeleton, through the on-disk cache (which also remembers that transformers cannot
    build a config, so that a repeat run skips the attempt). A cache that cannot be read or
    written is ignored (the skeleton is then built), never an error."""
    cfg_path = model_dir / "config.json"
    folder = cache_dir()
    if folder is None or not cfg_path.is_file():
        return build_skeleton(model_dir)
    path = folder / f"skeleton-{_cache_key(cfg_path.read_bytes())}.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        raw = None
    if isinstance(raw, dict) and isinstance(raw.get("unavailable"), str):
        raise ModelClassUnavailable(raw["unavailable"])
    try:
        return Skeleton(
            linears=set(raw["linears"]), experts=dict(raw["experts"]),
            expert_modules=set(raw["expert_modules"]), prefix=raw["prefix"],
            lm_head=set(raw["lm_head"]), model_class=raw["model_class"],
        )
    except (ValueError, KeyError, TypeError):
        pass
    try:
        sk = build_skeleton(model_dir)
        data = {k: sorted(v) if isinstance(v, set) else v for k, v in asdict(sk).items()}
    except ModelClassUnavailable as e:
        _store(folder, path, {"unavailable": str(e)})
        raise
    _store(folder, path, data)
    return sk


def _store(folder: Path, path: Path, data: dict) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)  # atomic: a concurrent reader sees no half-written file
    except OSError:
        pass
