"""Split-K's reduction and the device buffers it needs, shared by the GEMV and the dot kernel.

A split-K launch runs SPLIT programs over slices of K for each output tile. Each stores its
fp32 partial in a scratch workspace and counts in at the tile's int32 counter; the last one
adds the partials in slice order (so the sum does not depend on which program ends last: no
float atomics) and puts the counter back to zero (no zeroing kernel).

Workspaces and counters are kept per device and CUDA stream and reused by every launch on that
stream: kernels of one stream run one after the other, so no two launches share them at once.
A larger request allocates a new buffer and keeps the old ones alive, because a captured CUDA
graph may point at them (limit: replaying a graph concurrently with eager calls issued on its
own capture stream is not supported).
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl


@triton.jit
def split_k_sum(part, w_ptrs, mask, slice_stride, pid_k, cnt, SPLIT: tl.constexpr):
    """Store this program's fp32 partial as slice pid_k of a slice-major scratch (slices
    `slice_stride` apart), then count in at the tile's counter `cnt` (int32, zero between
    launches; acq_rel atomic). Returns (last, total): the program that counts SPLIT - 1 is the
    last one; it adds the SPLIT partials in slice order and puts the counter back to 0."""
    tl.store(w_ptrs + pid_k * slice_stride, part, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the counter's release
    last = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == SPLIT - 1
    total = part
    if last:
        total = tl.load(w_ptrs, mask=mask, cache_modifier=".cg")
        for j in tl.static_range(1, SPLIT):
            total += tl.load(w_ptrs + j * slice_stride, mask=mask, cache_modifier=".cg")
        tl.store(cnt, 0)
    return last, total


_POOLS: dict[tuple, list[torch.Tensor]] = {}


def _pooled(kind: str, dtype: torch.dtype, device: torch.device, size: int) -> torch.Tensor:
    cuda = device.type == "cuda"
    key = (kind, device, torch.cuda.current_stream(device).cuda_stream if cuda else 0)
    bufs = _POOLS.setdefault(key, [])
    if not bufs or bufs[-1].numel() < size:
        # at least double: the buffers kept alive sum to under twice the largest
        n = max(size, 1 << 14, 2 * bufs[-1].numel() if bufs else 0)
        buf = _outside_graph_pools(n, dtype, device) if cuda else torch.empty(n, dtype=dtype)
        bufs.append(buf.zero_() if kind == "counters" else buf)  # zeroed on this stream
    return bufs[-1]


def counters(device: torch.device, size: int) -> torch.Tensor:
    """int32 tile counters (at least `size`), zero between launches, for this device and
    stream."""
    return _pooled("counters", torch.int32, device, size)


def workspace(device: torch.device, size: int) -> torch.Tensor:
    """fp32 scratch for split-K partials (at least `size` values), for this device and
    stream; every launch writes the slices it reads."""
    return _pooled("workspace", torch.float32, device, size)


def _outside_graph_pools(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[n] of `dtype` on `device`, allocated on a helper thread: while torch.compile's CUDA
    graphs warm up and record, this thread's allocations go to their private pool, and a buffer
    that outlives the call must not live there (they refuse untracked live tensors)."""
    box: list = []

    def alloc() -> None:
        try:
            box.append(torch.empty(n, dtype=dtype, device=device))
        except BaseException as e:  # re-raised on the caller's thread
            box.append(e)

    t = threading.Thread(target=alloc)
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]
