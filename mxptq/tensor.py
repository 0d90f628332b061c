"""The spine of mxptq: `QuantizedTensor`, `quantize_tensor` and `dequantize`.

Selectors produce a QuantizedTensor, kernels produce the same bytes faster, writers serialize
it, readers return it, and `dequantize` is the one definition of what its bytes mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import scales as S
from .formats import Format, e2m1_decode, get_format, pack_e2m1, unpack_e2m1

BACKENDS = ("auto", "torch", "triton")
_CHUNK_ELEMENTS = 1 << 22  # rows are processed in chunks of about this many weights


@dataclass
class QuantizedTensor:
    """Packed E2M1 codes uint8 [N, K/2] (low nibble = even element), block scales [N, K/B]
    (float8_e4m3fn for E4M3, uint8 codes otherwise), the fp32 encode global scale g (0-d) or
    None, and the format that says how to read them."""

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
    format: Format

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1] * 2)

    def scale_codes(self) -> torch.Tensor:
        """Block scales as int32 codes, whatever their storage dtype."""
        return self.format.scale.from_storage(self.scales)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        g = None if self.global_scale is None else self.global_scale.to(device)
        return QuantizedTensor(self.codes.to(device), self.scales.to(device), g, self.format)


def check_weight(w: torch.Tensor, fmt: Format) -> None:
    """Raise ValueError naming the problem if `w` cannot be quantized in `fmt`."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported weight dtype {w.dtype} (bf16, fp16 or fp32)")
    k = w.shape[1]
    if k % fmt.block_size:
        raise ValueError(
            f"input dimension {k} is not a multiple of the block size {fmt.block_size}"
        )
    if w.numel() and not bool(torch.isfinite(w).all()):
        n_nan = int(torch.isnan(w).sum())
        n_inf = int(torch.isinf(w).sum())
        raise ValueError(f"weight has {n_nan} NaN and {n_inf} Inf values")


def _check_importance(
    h: torch.Tensor | None, k: int, device: torch.device, b: int | None = None
) -> torch.Tensor | None:
    """Importance as fp32 on `device`: diagonal weights flattened to [K] (non-negative), or,
    given the block size b, block covariances [K/b, b, b] kept as they are."""
    if h is None:
        return None
    h = h.to(device=device, dtype=torch.float32)
    if b is not None and h.dim() == 3:
        if h.shape != (k // b, b, b):
            raise ValueError(f"block covariances have shape {tuple(h.shape)}, expected "
                             f"{(k // b, b, b)}")
        if not bool(torch.isfinite(h).all()):
            raise ValueError("block covariances must be finite")
        return h
    h = h.flatten()
    if h.numel() != k:
        raise ValueError(f"importance has {h.numel()} entries, expected K = {k}")
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError("importance weights must be finite and non-negative")
    return h


def quantize_tensor(
    w: torch.Tensor,
    format: str | Format = "nvfp4",
    scale: str = "search",
    block_size: int | None = None,
    importance: torch.Tensor | None = None,
    *,
    window: tuple[int, int] | None = None,
    underflow_floor: bool = True,
    global_norm: float | None = None,
    global_amax: torch.Tensor | float | None = None,
    backend: str = "auto",
) -> QuantizedTensor:
    """Quantize a 2-D weight [N, K] to FP4 with block scales chosen by `scale`.

    `importance` (length K) weights the block error per input channel; block covariances
    [K/B, B, B] make every selector minimise the quadratic form (w − ŵ)ᵀ H_b (w − ŵ) of each
    block instead. `global_amax` overrides the tensor's own amax, so that fused projections can
    share one global scale. `backend`: "auto" runs the Triton kernel for CUDA tensors and the
    torch reference otherwise; both give the same bytes (the quadratic form through
    kernels/hessian.py).
    """
    fmt = get_format(format, block_size)
    cfg = S.resolve_selector(fmt, scale, window, underflow_floor, global_norm)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    check_weight(w, fmt)
    h = _check_importance(importance, w.shape[1], w.device, fmt.block_size)
    use_triton = backend == "triton" or (backend == "auto" and w.is_cuda)
    if use_triton and S.is_block_covariance(h, fmt.block_size):
        from .kernels.hessian import quantize_hessian

        return quantize_hessian(w, fmt, cfg, h, global_amax)
    if use_triton:
        from .kernels import quantize as triton_quantize

        return triton_quantize(w, fmt, cfg, h, global_amax)
    return quantize_reference(w, fmt, cfg, h, global_amax)


def tensor_amax(w: torch.Tensor) -> torch.Tensor:
    return w.abs().amax().float() if w.numel() else torch.zeros((), device=w.device)


def quantize_reference(
    w: torch.Tensor,
    fmt: Format,
    cfg: S.SelectorConfig,
    h: torch.Tensor | None = None,
    global_amax: torch.Tensor | float | None = None,
) -> QuantizedTensor:
    """The torch reference: chunks of rows, every selector, every format."""
    n, k = w.shape
    b = fmt.block_size
    if fmt.has_global:
        amax = tensor_amax(w) if global_amax is None else torch.as_tensor(global_amax)
        g = S.global_encode_scale(amax.to(w.device), cfg.global_norm)
    else:
        g = torch.ones((), dtype=torch.float32, device=w.device)
    cov = S.is_block_covariance(h, b)
    hb = h if cov or h is None else h.view(k // b, b)
    codes = torch.empty((n, k // 2), dtype=torch.uint8, device=w.device)
    sc = torch.empty((n, k // b), dtype=torch.int32, device=w.device)
    rows = max(1, _CHUNK_ELEMENTS // (max(k, 1) * (b if cov else 1)))
    table = fmt.scale.table(w.device)
    inv_g = S.reciprocal(g)
    for r in range(0, n, rows):
        x = w[r : r + rows].float().view(-1, k // b, b)
        c = S.select_codes(x, fmt, cfg, g, hb)
        q = S.quantize_codes(x, table[c], inv_g)
        codes[r : r + rows] = pack_e2m1(q.view(x.shape[0], k))
        sc[r : r + rows] = c
    gs = g.reshape(()) if fmt.has_global else None
    return QuantizedTensor(codes, fmt.scale.to_storage(sc), gs, fmt)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What the bytes mean: w = E2M1(code) · (s / g), in float32 (or `dtype`), shape [N, K]."""
    n, k = qt.shape
    b = qt.format.block_size
    s = qt.format.scale.decode(qt.scale_codes())
    if qt.global_scale is not None:
        s = s / qt.global_scale.float()
    q = e2m1_decode(unpack_e2m1(qt.codes)).view(n, k // b, b)
    return (q * s.unsqueeze(-1)).view(n, k).to(dtype)


GLOBAL_STEPS = 16  # global-scale candidates: the selector's global_norm and 15 below it


def global_norm_candidates(top: float, steps: int = GLOBAL_STEPS) -> list[float]:
    """global_norm values tried by the global-scale search: `top` (the selector's default)
    and steps-1 more spread evenly in log over the octave below it. Scaling g by 2 only moves
    every block scale by one binade, so one octave spans every distinct placement of the E4M3
    grid relative to the block maxima; lower octaves only lose the top codes."""
    return [top * 2.0 ** (-j / steps) for j in range(steps)]


def selected_error(
    w: torch.Tensor,
    fmt: Format,
    cfg: S.SelectorConfig,
    h: torch.Tensor | None,
    g: torch.Tensor,
) -> float:
    """Σ over blocks of the selector's own error at its chosen codes, in weight units (the
    encoded-unit error / g²), summed in float64: what the global-scale search compares."""
    n, k = w.shape
    b = fmt.block_size
    cov = S.is_block_covariance(h, b)
    hb = h if cov or h is None else h.view(k // b, b)
    rows = max(1, _CHUNK_ELEMENTS // (max(k, 1) * (b if cov else 1)))
    table = fmt.scale.table(w.device)
    inv_g = S.reciprocal(g)
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for r in range(0, n, rows):
        x = w[r : r + rows].float().view(-1, k // b, b)
        c = S.select_codes(x, fmt, cfg, g, hb)
        total += S.block_error(x, x * g, table[c], inv_g, hb).double().sum()
    return float(total / float(g) ** 2)


def search_global_norm(
    ws: list[torch.Tensor],
    format: str | Format = "nvfp4",
    scale: str = "search",
    block_size: int | None = None,
    importances: list[torch.Tensor | None] | None = None,
    *,
    global_amax: torch.Tensor | float | None = None,
    steps: int = GLOBAL_STEPS,
) -> float | None:
    """The global_norm whose block selection gives the least total error over `ws` (a fused
    set: one amax, one global scale), or None for formats without a global scale. Candidates
    are `global_norm_candidates`, visited from the default down; a later one wins only when
    strictly better, so ties keep the default. Each candidate runs the exact torch reference
    selector (with each weight's importance), so the cost is `steps` quantizations."""
    fmt = get_format(format, block_size)
    cfg = S.resolve_selector(fmt, scale)
    if not fmt.has_global:
        return None
    importances = importances or [None] * len(ws)
    dev = ws[0].device
    if global_amax is None:
        global_amax = torch.stack([tensor_amax(w) for w in ws]).amax()
    amax = torch.as_tensor(global_amax).to(dev).float()
    hs = [_check_importance(h, w.shape[1], dev, fmt.block_size)
          for w, h in zip(ws, importances, strict=True)]
    best, best_err = cfg.global_norm, float("inf")
    for norm in global_norm_candidates(cfg.global_norm, steps):
        c = S.resolve_selector(fmt, scale, global_norm=norm)
        g = S.global_encode_scale(amax, norm)
        err = sum(selected_error(w, fmt, c, h, g) for w, h in zip(ws, hs, strict=True))
        if err < best_err:
            best, best_err = norm, err
    return best
