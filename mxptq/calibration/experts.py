"""MoE experts that the calibration text routes few or no tokens to.

An expert's statistics are sums over the tokens the router sent it. With fewer tokens than its
input width K, Σ x xᵀ has rank below K (GPTQ's Hessian is then mostly damping) and E[x²] rests
on a handful of samples; with none at all there is nothing. Such an expert keeps its own tokens
and is topped up to T = K tokens (`min_tokens` when given) with the pooled statistics of every
expert of the same projection in the same layer, weighted by token counts (the sums of all
routed tokens): S = S_e + w·S_pool, n = n_e + w·N_pool = T, with w = (T − n_e) / N_pool.
It is shrinkage towards the layer's routed-token distribution: an expert with no token gets
exactly the pooled mean, one with T tokens or more its own statistics unchanged, and in
between the pooled part fades linearly. Its activation amax (W4A4) is the larger of its own
and the pool's, since a few tokens under-estimate the range the expert will see when served.
"""

from __future__ import annotations

import re

from .stats import LinearStats

_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def expert_groups(stats: dict[str, LinearStats]) -> dict[str, list[tuple[str, LinearStats]]]:
    """Expert statistics by projection (`….experts.*.gate_proj`): (name, stats) in expert
    order, one entry per distinct LinearStats (gate and up of a fused expert share one)."""
    groups: dict[str, list[tuple[int, str, LinearStats]]] = {}
    for name, s in stats.items():
        m = _EXPERT.search(name)
        if m:
            key = _EXPERT.sub(".experts.*.", name, count=1)
            groups.setdefault(key, []).append((int(m[1]), name, s))
    out = {}
    for key, members in groups.items():
        seen, uniq = set(), []
        for _, name, s in sorted(members, key=lambda t: (t[0], t[1])):
            if id(s) not in seen:
                seen.add(id(s))
                uniq.append((name, s))
        out[key] = uniq
    return out


def pool_starved_experts(stats: dict[str, LinearStats], min_tokens: int | None = None) -> list[str]:
    """Top up, in place, every expert with fewer than T tokens (T = `min_tokens`, default its
    input width) from its siblings' pooled statistics (module docstring); returns the names
    (every name sharing a topped-up LinearStats). `min_tokens=0` does nothing; a projection
    none of whose experts saw a token is left alone (plain RTN)."""
    done: list[str] = []
    if min_tokens == 0:
        return done
    pools = []  # every pool from the statistics as collected, before any is topped up
    for members in expert_groups(stats).values():
        own = [s for _, s in members if s.tokens]
        if own:
            xtx = sum(s.xtx for s in own) if all(s.xtx is not None for s in own) else None
            bxx = sum(s.bxx for s in own) if all(s.bxx is not None for s in own) else None
            pools.append((members, sum(s.tokens for s in own), sum(s.sq_sum for s in own), xtx,
                          bxx, max(s.amax for s in own)))
    for members, pool_n, pool_sq, pool_xtx, pool_bxx, pool_amax in pools:
        for _, s in members:
            target = min_tokens if min_tokens is not None else s.in_features
            if s.borrowed or s.tokens >= target:  # gate and up share one: topped up once
                continue
            w = (target - s.tokens) / pool_n
            s.sq_sum = w * pool_sq if s.sq_sum is None else s.sq_sum + w * pool_sq
            if s.with_hessian and pool_xtx is not None:
                s.xtx = w * pool_xtx if s.xtx is None else s.xtx + w * pool_xtx
            if s.block and pool_bxx is not None:
                s.bxx = w * pool_bxx if s.bxx is None else s.bxx + w * pool_bxx
            s.amax = max(s.amax, pool_amax)
            s.borrowed = target - s.tokens
            s.tokens = target
    starved = {id(s) for s in stats.values() if s.borrowed}
    return [n for n, s in stats.items() if id(s) in starved]
