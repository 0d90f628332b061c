"""The plan's second way to know a model: from the safetensors headers alone.

When transformers cannot build the model class (a model type newer than the installed version,
remote code, an unknown architecture), the skeleton that the plan needs (which tensors are
Linear weights, which is the head, how fused 3-D expert tensors are laid out) is inferred from
tensor names and shapes, and the rest of the plan is the same code as for a known class:

| tensor | decision |
|---|---|
| 2-D `*.weight` inside repeated layers (a `.<n>.` path segment) | Linear: quantized |
| ... whose module name matches `DENSE` (norms, embeddings, routers) | dense |
| `lm_head.weight` (or no head in the checkpoint of a `*ForCausalLM`: tied) | the head |
| 3-D `*.experts.gate_up_proj` / `*.experts.down_proj` | fused experts, layout from shapes |
| anything else (embeddings, final norm, other heads, biases) | dense |

Fused sets (one shared global scale) come from the plan's FUSED_SETS table of leaf names, kept
only where the members share an input width; a recipe's `fused-set` replaces that table.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from fnmatch import fnmatchcase
from pathlib import Path

from .checkpoint.safetensors_io import TensorInfo
from .skeleton import Skeleton

LAYER = re.compile(r"\.\d+\.")  # a module inside repeated layers
# Modules inside layers that are not quantized Linear layers (fnmatch on the module name).
DENSE = ("*norm*", "*embed*", "*.gate", "*router*", "*shared_expert_gate", "*.wte", "*.wpe")
_EXPERTS_3D = re.compile(r"\.experts\.([^.]+)$")
_CAUSAL = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _hidden_size(cfg: dict) -> int | None:
    for c in (cfg, cfg.get("text_config") or {}):
        for key in ("hidden_size", "d_model", "n_embd", "dim"):
            if isinstance(c.get(key), int):
                return c[key]
    return None


def expert_layout(pname: str, shape: tuple[int, ...], hidden: int | None) -> str:
    """[E, out, in] ("out_in") or [E, in, out] ("in_out") for gate_up_proj (in = hidden) and
    down_proj (out = hidden); "unknown" when the shapes cannot tell (the plan refuses)."""
    if hidden is None or len(shape) != 3 or pname not in ("gate_up_proj", "down_proj"):
        return "unknown"
    _, a, b = shape
    if (a == hidden) == (b == hidden):
        return "unknown"
    hidden_first = a == hidden
    if pname == "down_proj":
        return "out_in" if hidden_first else "in_out"
    return "in_out" if hidden_first else "out_in"


def skeleton_from_names(infos: list[TensorInfo], model_dir: Path) -> Skeleton:
    """The skeleton the model class would give, inferred from names and shapes (table above)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden = _hidden_size(cfg)
    sk = Skeleton(model_class="")
    for info in infos:
        m = _EXPERTS_3D.search(info.name)
        if m and len(info.shape) == 3:
            sk.experts[info.name] = expert_layout(m.group(1), info.shape, hidden)
            sk.expert_modules.add(info.name.rpartition(".")[0])
            continue
        if not info.name.endswith(".weight") or len(info.shape) != 2:
            continue
        module = info.name[: -len(".weight")]
        if module.rpartition(".")[2] == "lm_head":
            sk.linears.add(module)
            sk.lm_head.add(module)
        elif LAYER.search(module) and not any(fnmatchcase(module, p) for p in DENSE):
            sk.linears.add(module)
    archs = cfg.get("architectures") or []
    if not sk.lm_head and any(a.endswith(_CAUSAL) for a in archs):
        sk.linears.add("lm_head")  # tied to the embeddings: a Linear the checkpoint lacks
        sk.lm_head.add("lm_head")
    return sk


def collapse(items) -> list[tuple[str, int, str, str]]:
    """The plan per name pattern (layer and expert indices as `*`): (pattern, count, shape,
    decision), in first-seen order; what --dry-run shows for a name-based plan."""
    rows: dict[tuple[str, str], list] = {}
    for it in items:
        pat = re.sub(r"\.\d+(?=\.|$)", ".*", it.name)
        what = "quantize" + (" (fused set)" if it.group else "") if it.action == "quantize" \
            else f"keep: {it.reason.split(' (')[0]}"
        key = (pat, what)
        rows.setdefault(key, [0, Counter()])
        rows[key][0] += 1
        rows[key][1][str(list(it.info.shape))] += 1
    out = []
    for (pat, what), (n, shapes) in rows.items():
        shape = next(iter(shapes)) if len(shapes) == 1 else f"{len(shapes)} shapes"
        out.append((pat, n, shape, what))
    return out
