"""Run calibration tokens through a model one transformer layer at a time (the decoder layers
of a causal LM, the encoder layers of a BERT-style encoder; `layers.py` finds them).

Only the current layer's weights sit on the device. The model is either built on the meta
device and filled layer by layer from its safetensors shards, or (when checkpoint names need
transformers' load-time conversions, e.g. fused MoE experts) loaded on CPU and moved to the
device one layer at a time. Each layer's inputs (hidden states and the keyword arguments the
model passes it: masks, position ids, rotary embeddings) are captured by swapping every layer's
forward for a recorder during one pass of the whole model, so per-layer arguments (sliding
window masks, per-layer rotary tables) are exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .experts import pool_starved_experts
from .hooks import attach_stat_hooks
from .layers import is_causal, transformer_layers
from .parallel import Group, merge_batch, run_spread
from .stats import LinearStats
from .weights import WeightStore, open_model


@dataclass
class LayerRun:
    """What a per-layer callback sees: the layer (weights on the device) and its statistics,
    keyed by full module name (experts as `...experts.{e}.{gate,up,down}_proj`)."""

    index: int
    prefix: str
    layer: nn.Module
    stats: dict[str, LinearStats]


@dataclass
class CalibrationResult:
    """Statistics of every quantizable Linear, those that saw no token (unrouted experts) and
    the experts whose statistics were completed from their siblings' (`experts.py`)."""

    stats: dict[str, LinearStats] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)
    pooled: list[str] = field(default_factory=list)
    lazy: bool = True  # weights came from the shards one layer at a time


class _Stop(Exception):
    """Raised by the last layer's recorder: nothing after the decoder layers needs to run."""


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class _Dedup:
    """Keep one copy of equal keyword tensors across batches (masks, rotary tables)."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, obj):
        if isinstance(obj, tuple | list):
            return type(obj)(self(o) for o in obj)
        if not isinstance(obj, torch.Tensor):
            return obj
        for t in self.seen:
            if t.shape == obj.shape and t.dtype == obj.dtype and torch.equal(t, obj):
                return t
        self.seen.append(obj)
        return obj


def _capture_inputs(
    model, layers, store: WeightStore, ids: torch.Tensor, batch: int, hidden_device
) -> tuple[torch.Tensor, list[list[tuple[tuple, dict]]]]:
    """Layer-0 hidden states [n, L, H] and inputs[layer][batch] = (positional arguments after
    the hidden states, keyword arguments) from recorder passes."""
    hidden: list[torch.Tensor] = []
    kwargs: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
    dedup = _Dedup()
    last = len(layers) - 1

    def recorder(i: int):
        def forward(*args, **kw):
            hs, rest = (args[0], args[1:]) if args else (kw.pop("hidden_states"), ())
            kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")}
            kwargs[i].append((dedup(rest), {k: dedup(v) for k, v in kw.items()}))
            if i == 0:
                hidden.append(hs.to(hidden_device))
            if i == last:
                raise _Stop
            return hs

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    handles = store.load_on_call(model, skip=layers)
    causal = is_causal(model.config)
    try:
        with torch.no_grad():
            for b in range(0, ids.shape[0], batch):
                x = ids[b : b + batch].to(store.device)
                extra = {} if causal else {"attention_mask": torch.ones_like(x)}
                with contextlib.suppress(_Stop):
                    model(input_ids=x, use_cache=False, **extra)
    finally:
        for layer in layers:
            del layer.forward
        for h in handles:
            h.remove()
        store.release_non_layers(model, skip=layers)
    return torch.cat(hidden), kwargs


def _run_layer(layer, hidden, kwargs, batch: int, device, out: torch.Tensor | None,
               stats: dict[str, LinearStats] | None = None, group: Group | None = None
               ) -> dict[str, LinearStats] | None:
    """Forward every batch through one layer (with `group`, this rank's share, the others'
    outputs received); writes outputs into `out` when given. With `stats` (what the layer's
    hooks add to), returns the totals: each batch's sums merged in batch order."""
    starts = range(0, hidden.shape[0], batch)
    units = list({id(s): s for s in (stats or {}).values()}.values())  # gate/up share one
    totals = [u.empty_like() for u in units]

    def forward(j: int) -> None:
        b = starts[j]
        with torch.no_grad():
            args, kw = _to(kwargs[j], device)
            y = layer(hidden[b : b + batch].to(device), *args, **kw)
            if out is not None:
                out[b : b + batch] = (y[0] if isinstance(y, tuple) else y).to(out.device)

    if group is None:
        for j in range(len(starts)):
            forward(j)
            merge_batch(units, totals)
    else:
        rows = None if out is None else (lambda j: out[starts[j] : starts[j] + batch])
        run_spread(len(starts), forward, group, rows, units, totals, device)
    if stats is None:
        return None
    by_id = {id(u): t for u, t in zip(units, totals, strict=True)}
    return {k: by_id[id(s)] for k, s in stats.items()}


def _fits_on_device(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return 2 * nbytes < free // 2  # inputs and outputs, with room left for the layer


def calibrate(
    model: str | Path | nn.Module,
    input_ids: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    hessian: bool = False,
    blocks: int = 0,
    on_layer: Callable[[LayerRun], None] | None = None,
    sequential: bool = True,
    batch_size: int = 8,
    keep_stats: bool = True,
    start: int = 0,
    hidden: torch.Tensor | None = None,
    on_boundary: Callable[[int, torch.Tensor], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    min_expert_tokens: int | None = None,
    group: Group | None = None,
) -> CalibrationResult:
    """Collect per-Linear input statistics, one transformer layer at a time.

    `model` is a checkpoint folder (loaded lazily) or a model already in memory (its layers
    visit the device one at a time and return to where they were). `on_layer` is called after
    each layer's statistics are complete and may change the layer's weights in place (e.g.
    replace them by their dequantized FP4 values); with `sequential`, the next layer then sees
    the outputs of the changed layer. `keep_stats=False` drops each layer's statistics after
    the callback (Hessians of a large model do not fit in memory all at once).

    `blocks` > 0 also collects each Linear's block covariances (blocks of that many input
    channels, `--importance hessian`).

    Resuming: `start` layers are taken as done and `hidden` [n, L, H] as the hidden states
    entering layer `start` (what `on_boundary(k, hidden)` was given after layer k-1, for every
    k up to the number of layers). `on_progress(done, total)` counts finished layers.

    MoE experts that saw fewer than `min_expert_tokens` tokens (default: their input width)
    have their statistics completed from their sibling experts' (`experts.py`) before
    `on_layer` sees them; 0 turns that off.

    With `group` (torch.distributed initialised), the batches are spread over its ranks
    (`parallel.py`): each runs its share, and every rank ends each layer with every output and
    the statistics one process would have, bit for bit. Every rank must make the same call.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model, store = open_model(model, device, dtype)
    prefix, layers = transformer_layers(model)
    n, seqlen = input_ids.shape
    hidden_size = model.config.get_text_config().hidden_size
    nbytes = n * seqlen * hidden_size * torch.finfo(dtype).bits // 8
    hidden_device = device if _fits_on_device(device, nbytes) else torch.device("cpu")
    first, kwargs = _capture_inputs(model, layers, store, input_ids, batch_size, hidden_device)
    if hidden is None:
        hidden = first
    elif hidden.shape != first.shape or hidden.dtype != first.dtype:
        raise ValueError(f"resumed hidden states {tuple(hidden.shape)} {hidden.dtype} do not "
                         f"match the windows' {tuple(first.shape)} {first.dtype}")
    else:
        hidden = hidden.to(hidden_device)
    del first
    result = CalibrationResult(lazy=store.lazy)
    if on_progress is not None:
        on_progress(start, len(layers))
    for i, layer in enumerate(layers):
        if i < start:
            continue
        name = f"{prefix}.{i}"
        store.load(name, layer)
        stats, handles = attach_stat_hooks(layer, name, hessian, blocks)
        out = torch.empty_like(hidden)
        try:
            stats = _run_layer(layer, hidden, kwargs[i], batch_size, device, out, stats, group)
        finally:
            for h in handles:
                h.remove()
        result.empty += [k for k, s in stats.items() if s.tokens == 0]
        result.pooled += pool_starved_experts(stats, min_expert_tokens)
        if on_layer is not None:
            on_layer(LayerRun(i, name, layer, stats))
            if sequential:
                _run_layer(layer, hidden, kwargs[i], batch_size, device, out, group=group)
        if keep_stats:
            result.stats.update({k: s.to("cpu") for k, s in stats.items()})
        store.release(name, layer)
        hidden = out
        if on_boundary is not None:
            on_boundary(i + 1, hidden)
        if on_progress is not None:
            on_progress(i + 1, len(layers))
    return result
