"""GPTQ for block-scaled FP4, with the block scales chosen by any selector (docs/numerics.md §3.5).

The column loop is the reference GPTQ (Frantar et al.): Cholesky factor of H⁻¹, columns in
blocks of 128 with lazy batch updates, damping, optional activation order. Groups are the
format's scale blocks in *original* column order, so the result packs like any other weight:
- "lazy" scales: a group's scale is chosen when GPTQ first reaches one of its columns, on the
  current (error-updated) weights of all its columns, including pending lazy updates;
- "static" scales: all chosen up front from the original weights (as FP-Quant and the 4/6 fork do).
Elements round exactly as `mxptq.scales.quantize_codes`, and the returned weight is exactly
`dequantize` of the returned bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import scales as S
from ..errors import MxptqError
from ..formats import e2m1_decode, get_format, pack_e2m1
from ..tensor import BACKENDS, QuantizedTensor, _check_importance, check_weight, tensor_amax

GPTQ_SCALES = ("lazy", "static")


@dataclass
class GPTQResult:
    qt: QuantizedTensor
    weight: torch.Tensor  # fp32 [N, K], equal to dequantize(qt)


def _inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = percdamp·mean(diag H)."""
    h = h.clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise MxptqError(
            f"GPTQ: the Hessian is not positive definite with damping {percdamp}; raise --damp"
        )
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    format: str = "nvfp4",
    scale: str = "search",
    block_size: int | None = None,
    *,
    scales: str = "lazy",
    percdamp: float = 0.01,
    act_order: bool = False,
    block: int = 128,
    importance: torch.Tensor | None = None,
    global_amax: torch.Tensor | float | None = None,
    window: tuple[int, int] | None = None,
    global_norm: float | None = None,
    backend: str = "auto",
) -> GPTQResult:
    """Quantize w [N, K] against the layer Hessian H [K, K] (2/n Σ x xᵀ).

    `global_amax` fixes the amax behind the global scale (a fused set's shared amax); by
    default it is the amax of the original `w`. `importance` (length K, or block covariances
    [K/B, B, B]) weights the selector's block error, as in `quantize_tensor`. `backend` "auto"
    runs each column block as one Triton launch on CUDA tensors (same bytes as the torch loop),
    "triton" forces that, "torch" the loop; activation order always takes the torch loop.
    """
    if scales not in GPTQ_SCALES:
        raise ValueError(f"unknown GPTQ scale mode {scales!r} (one of {', '.join(GPTQ_SCALES)})")
    fmt = get_format(format, block_size)
    cfg = S.resolve_selector(fmt, scale, window, True, global_norm)
    check_weight(w, fmt)
    n, k = w.shape
    bs = fmt.block_size
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match K = {k}")
    dev = w.device
    h = _check_importance(importance, k, dev, bs)
    cov = S.is_block_covariance(h, bs)
    hb = h if cov or h is None else h.view(k // bs, bs)
    if fmt.has_global:
        amax = tensor_amax(w) if global_amax is None else torch.as_tensor(global_amax)
        g = S.global_encode_scale(amax.to(dev), cfg.global_norm)
    else:
        g = torch.ones((), dtype=torch.float32, device=dev)
    inv_g = S.reciprocal(g)

    W = w.float().clone()
    H = hessian.to(dev, torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(k)
    perm = perm.to(dev)
    invperm = torch.argsort(perm)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_hessian_factor(H, percdamp)

    n_groups = k // bs
    sc = torch.zeros((n, n_groups), dtype=torch.int32, device=dev)
    if scales == "static":
        sc[:] = S.select_codes(w.float().view(n, n_groups, bs), fmt, cfg, g, hb)
    Q = torch.zeros_like(W)
    codes = torch.zeros((n, k), dtype=torch.uint8, device=dev)

    if _use_kernel(backend, dev, block, bs, act_order):
        from ..kernels.gptq import gptq_block

        gv = torch.stack([g.reshape(()), inv_g.reshape(())]).float()
        for i1 in range(0, k, block):
            i2 = min(i1 + block, k)
            if h is None or scales == "static":
                imp = None
            else:
                imp = h[i1 // bs : i2 // bs] if cov else h[i1:i2]
            sl = slice(i1 // bs, i2 // bs)
            err1 = gptq_block(
                W[:, i1:i2], Hinv[i1:i2, i1:i2], imp, sc[:, sl], codes[:, i1:i2], Q[:, i1:i2],
                gv, fmt, cfg, scales == "lazy", block,
            )
            W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]
    else:
        _column_loop(W, Hinv, Q, codes, sc, scales == "static", perm, invperm, hb, fmt, cfg, g,
                     inv_g, block)

    qt = QuantizedTensor(
        pack_e2m1(codes[:, invperm]),
        fmt.scale.to_storage(sc),
        g.reshape(()) if fmt.has_global else None,
        fmt,
    )
    return GPTQResult(qt, Q[:, invperm].contiguous())


def _use_kernel(backend: str, dev: torch.device, block: int, bs: int, act_order: bool) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    if backend == "torch" or (backend == "auto" and dev.type != "cuda"):
        return False
    from ..kernels.gptq import supported

    return supported(block, bs, act_order)


def _column_loop(W, Hinv, Q, codes, sc, static, perm, invperm, hb, fmt, cfg, g, inv_g, block):
    """The reference GPTQ loop in torch: column by column, lazy batch updates per block; with
    `static` scales `sc` is already filled, else each group's is chosen on first reaching it."""
    n, k = W.shape
    bs = fmt.block_size
    dev = W.device
    have = torch.full((k // bs,), static, dtype=torch.bool)
    group_of = (perm // bs).tolist()
    table = fmt.scale.table(dev)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            grp = group_of[i1 + i]
            if not have[grp]:
                pos = invperm[grp * bs : (grp + 1) * bs]  # where the group's columns sit now
                in_blk = pos < i2
                cur = torch.empty((n, bs), device=dev)
                cur[:, in_blk] = W1[:, pos[in_blk] - i1]
                later = pos[~in_blk]
                cur[:, ~in_blk] = W[:, later] - Err1[:, :i] @ Hinv[i1 : i1 + i, later]
                sel_h = None if hb is None else hb[grp : grp + 1]
                sc[:, grp] = S.select_codes(cur.view(n, 1, bs), fmt, cfg, g, sel_h)[:, 0]
                have[grp] = True
            s = table[sc[:, grp]]
            col = W1[:, i]
            c = S.quantize_codes(col.unsqueeze(-1), s, inv_g)[:, 0]
            q = e2m1_decode(c) * (s / g)
            codes[:, i1 + i], Q[:, i1 + i] = c, q
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

