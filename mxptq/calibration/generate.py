"""Data-free calibration: the model writes its own calibration windows (`--calib generate[:N]`).

Each window starts with the BOS token (EOS when the model has none) and continues with tokens
sampled from the model at temperature 1 with a KV cache, many windows per batch; after an EOS
the next token is BOS, so a window is a run of generated documents, like packed real text.
Sampling is the Gumbel-max trick with noise from a counter-based hash of (seed, window, position,
token id): a window's tokens do not depend on how windows are batched, and the same seed on the
same device and software gives the same windows.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import MxptqError

_M32 = 0xFFFFFFFF
# Rows of KV cache per batch are sized to this share of the device's total memory (CPU: 1 GiB).
_KV_SHARE = 0.25
_CPU_KV_BYTES = 1 << 30


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 values in [0, 2^32); the
    multipliers stay below 2^31 so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x31848BAB) & _M32
    return x ^ (x >> 14)


def gumbel_noise(seed: int, rows: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [len(rows), vocab] in float64, a pure function of (seed, row index,
    step, token id) on any device."""
    dev = rows.device
    s = _mix(torch.tensor([(seed & _M32) ^ _mix(torch.tensor(seed >> 32 & _M32)).item()],
                          device=dev))
    k = _mix(_mix(s ^ rows.to(torch.int64)) ^ step)
    v = torch.arange(vocab, device=dev, dtype=torch.int64)
    x = _mix(_mix(k[:, None] ^ v[None, :]) ^ 0x5BD1E995)
    u = (x.double() + 0.5) / 2.0**32
    return -torch.log(-torch.log(u))


def _token_ids(config) -> tuple[int, set[int]]:
    """The start token (BOS, else EOS) and the EOS ids."""
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list | tuple) else [] if eos is None else [eos])
    start = config.bos_token_id if config.bos_token_id is not None else min(eos_ids, default=None)
    if start is None:
        raise MxptqError("--calib generate: the model config names no BOS or EOS token to start "
                         "the windows with; pass a calibration text instead")
    return int(start), eos_ids


def rows_per_batch(config, seqlen: int, n: int, device: torch.device, elem_bytes: int) -> int:
    """Windows generated together: their KV cache fits a fixed share of the device's memory
    (a function of the device kind only, so the same machine batches the same way)."""
    cfg = config.get_text_config()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    per_row = 2 * cfg.num_hidden_layers * kv_heads * head_dim * seqlen * elem_bytes
    if device.type == "cuda":
        budget = int(_KV_SHARE * torch.cuda.get_device_properties(device).total_memory)
    else:
        budget = _CPU_KV_BYTES
    return max(1, min(n, budget // max(per_row, 1)))


def load_generator(model_dir: Path, device: torch.device) -> nn.Module:
    """The whole model on the device (generation needs every layer at every step): the
    checkpoint's dtype on CUDA, fp32 on CPU. Refused when its weights do not fit."""
    from transformers import AutoModelForCausalLM

    from .weights import quiet_loading

    dtype = "auto" if device.type == "cuda" else torch.float32
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if device.type == "cuda":
        need = sum(p.numel() * p.element_size() for p in model.parameters())
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.8 * free:
            raise MxptqError(
                f"--calib generate: the model's weights ({need / 2**30:.1f} GiB) do not fit the "
                f"free GPU memory ({free / 2**30:.1f} GiB) with room for the KV cache; pass a "
                "calibration text instead"
            )
    return model.to(device).eval()


def generate_windows(
    model: nn.Module,
    n: int,
    seqlen: int,
    seed: int = 0,
    batch_rows: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """`n` windows of `seqlen` tokens written by `model` (LongTensor [n, seqlen], on CPU).
    `on_progress(k)` is called with the number of tokens each step added."""
    if n < 1 or seqlen < 2:
        raise MxptqError("need at least 1 calibration sample of at least 2 tokens")
    config = model.config
    device = next(model.parameters()).device
    start, eos_ids = _token_ids(config)
    bos = config.bos_token_id
    vocab = model.get_output_embeddings().weight.shape[0]
    elem = next(model.parameters()).element_size()
    rows = batch_rows or rows_per_batch(config, seqlen, n, device, elem)
    # transformers 5.x names the cache argument `cache`, earlier versions `past_key_values`
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    eos_t = torch.tensor(sorted(eos_ids), device=device, dtype=torch.long)
    out = torch.empty((n, seqlen), dtype=torch.long)
    with torch.no_grad():
        for b0 in range(0, n, rows):
            idx = torch.arange(b0, min(b0 + rows, n), device=device)
            cur = torch.full((len(idx), 1), start, dtype=torch.long, device=device)
            seq = [cur]
            cache = DynamicCache(config=config)
            for step in range(1, seqlen):
                res = model(input_ids=cur, use_cache=True, **{cache_kw: cache})
                logits = res.logits[:, -1, :vocab].double()
                nxt = torch.argmax(logits + gumbel_noise(seed, idx, step, vocab), dim=-1)
                if bos is not None and len(eos_t) and bos not in eos_ids:
                    nxt = torch.where(torch.isin(cur[:, 0], eos_t), bos, nxt)
                cur = nxt[:, None]
                seq.append(cur)
                if on_progress is not None:
                    on_progress(len(idx))
            out[b0 : b0 + len(idx)] = torch.cat(seq, dim=1).cpu()
            del cache
    return out
