"""Tensor abs-max for the global scale: a grid-stride Triton reduction to per-program partial
maxima (max is exact in any order, so the partials need no fixed order)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .numerics import widen

_BLOCK = 8192
_MAX_PROGRAMS = 1056  # 8 per H100 multiprocessor: enough loads in flight


@triton.jit
def _amax_kernel(w_ptr, out_ptr, numel, progs, iters, BLOCK: tl.constexpr, BF16_BITS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    i = 0
    while i < iters:  # a while loop: the interpreter cannot take a runtime range() bound
        offs = (pid + i * progs).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(w_ptr + offs, mask=offs < numel, other=0)
        acc = tl.maximum(acc, tl.abs(widen(x, BF16_BITS)))
        i += 1
    tl.store(out_ptr + pid, tl.max(acc, axis=0))


def amax_partials(w: torch.Tensor) -> torch.Tensor:
    """fp32 partial maxima of |w| (at least one value, 0 for an empty tensor)."""
    w = w.contiguous().view(-1)
    progs = max(1, min(triton.cdiv(w.numel(), _BLOCK), _MAX_PROGRAMS))
    out = torch.empty(progs, dtype=torch.float32, device=w.device)
    bf16 = w.dtype == torch.bfloat16
    iters = triton.cdiv(w.numel(), progs * _BLOCK)
    _amax_kernel[(progs,)](
        w.view(torch.int16) if bf16 else w,
        out,
        w.numel(),
        progs,
        iters,
        BLOCK=_BLOCK,
        BF16_BITS=bf16,
        num_warps=8,
    )
    return out


def tensor_amax(w: torch.Tensor) -> torch.Tensor:
    """max |w| as a 0-d fp32 tensor on w's device (tensor.tensor_amax), without a host sync."""
    p = amax_partials(w)
    return (p if p.numel() == 1 else amax_partials(p)).reshape(())
