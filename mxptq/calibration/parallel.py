"""A layer's calibration batches spread over the ranks of a torch.distributed job.

Batch j runs on rank j mod W, in rounds of W batches. After each round every rank holds every
batch's output rows and statistics: each rank broadcasts its batch's outputs and its
statistics (two flat buffers, fp64 and fp32, laid out from a small manifest every rank
receives), and every rank merges the round's statistics in batch order. The totals are the
very sums one process makes batch after batch, bit for bit, on every rank; the forward passes,
the bulk of calibration, are split W ways.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .stats import LinearStats


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks that share the calibration."""

    rank: int
    world: int


def merge_batch(units: list[LinearStats], totals: list[LinearStats]) -> None:
    """Move what one batch added to `units` into `totals` (one process, or one rank's turn)."""
    for unit, total in zip(units, totals, strict=True):
        total.merge(unit.take())


def run_spread(n_batches: int, forward: Callable[[int], None], group: Group,
               rows: Callable[[int], torch.Tensor] | None,
               units: list[LinearStats], totals: list[LinearStats],
               device: torch.device) -> None:
    """Run `forward(j)` for this rank's batches; after each round, receive every batch's
    output rows (`rows(j)`, a contiguous view written in place) and merge every batch's
    statistics (what `forward` added to `units`) into `totals` in batch order."""
    w = group.world
    for t in range(0, n_batches, w):
        mine = t + group.rank < n_batches
        if mine:
            forward(t + group.rank)
        parts = [u.take() for u in units] if mine else []
        ranks = min(w, n_batches - t)  # the last round may be short
        for r in range(ranks if rows is not None else 0):
            tdist.broadcast(rows(t + r), src=r)
        if units:
            _exchange(parts, units, totals, group, ranks, device)


def _sizes(unit: LinearStats) -> tuple[int, int, int]:
    """Lengths of a batch's sums of `unit` that saw tokens: E[x²] and block covariances
    (fp64), Hessian (fp32); the conditions are those under which `LinearStats.add` makes them."""
    k = unit.in_features
    bxx = k * unit.block if unit.block and k % unit.block == 0 else 0
    return k, bxx, k * k if unit.with_hessian else 0


def _exchange(parts: list[LinearStats], units: list[LinearStats], totals: list[LinearStats],
              group: Group, ranks: int, device: torch.device) -> None:
    manifests: list = [None] * group.world
    tdist.all_gather_object(manifests, [(p.tokens, p.amax) for p in parts])
    for r in range(ranks):  # batch order: rank r ran batch t + r
        if r == group.rank:
            _send(parts, r)
        got = parts if r == group.rank else _receive(manifests[r], units, r, device)
        for total, part in zip(totals, got, strict=True):
            total.merge(part)


def _send(parts: list[LinearStats], src: int) -> None:
    f64 = [t.reshape(-1) for p in parts if p.tokens for t in (p.sq_sum, p.bxx) if t is not None]
    f32 = [p.xtx.reshape(-1) for p in parts if p.tokens and p.xtx is not None]
    for flat in (f64, f32):
        if flat:
            tdist.broadcast(torch.cat(flat), src=src)


def _receive(manifest: list[tuple[int, float]], units: list[LinearStats], src: int,
             device: torch.device) -> list[LinearStats]:
    """Rank `src`'s batch statistics, rebuilt from its manifest and buffers."""
    sizes = [_sizes(u) if tok else (0, 0, 0)
             for (tok, _), u in zip(manifest, units, strict=True)]
    f64 = torch.empty(sum(sq + bxx for sq, bxx, _ in sizes), dtype=torch.float64, device=device)
    f32 = torch.empty(sum(xtx for *_, xtx in sizes), dtype=torch.float32, device=device)
    for flat in (f64, f32):
        if flat.numel():
            tdist.broadcast(flat, src=src)
    out, o64, o32 = [], 0, 0
    for (tok, amax), u, (sq, bxx, xtx) in zip(manifest, units, sizes, strict=True):
        part = u.empty_like()
        if tok:
            k = u.in_features
            part.tokens, part.amax = tok, amax
            part.sq_sum = f64[o64 : o64 + sq]
            if bxx:
                part.bxx = f64[o64 + sq : o64 + sq + bxx].view(k // u.block, u.block, u.block)
            o64 += sq + bxx
            if xtx:
                part.xtx = f32[o32 : o32 + xtx].view(k, k)
                o32 += xtx
        out.append(part)
    return out
