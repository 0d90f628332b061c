"""Adversarial weight blocks for the exact-path tests: rows of K = 2·B weights (two blocks each)
that stress the candidate window and its certificate."""

from __future__ import annotations

import torch

GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _ulps(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """v moved by k fp32 ulps (k may be negative); v > 0."""
    return (v.view(torch.int32) + k.to(torch.int32)).view(torch.float32)


def adversarial(n: int, b: int, seed: int, spread: int = 60) -> list[torch.Tensor]:
    """Eight fp32 [n, 2·b] kinds: heavy-tailed at 2^-spread..2^spread, Gaussian, fp32
    subnormals, an outlier with tiny neighbours, ties (one element on the grid at several
    scales, zeros), a max with a cluster of equal smaller elements (the optimum far below c0:
    outside any window), and elements a few ulps off the E2M1 midpoints of a scale (near-ties
    that rounding decides). Kinds are separate tensors, so that each gets its own global scale."""
    gen = torch.Generator().manual_seed(seed)
    k = 2 * b

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    def uni(*shape):
        return torch.rand(*shape, generator=gen)

    mag = torch.randint(-spread, spread + 1, (n, 1), generator=gen).exp2()
    heavy = rnd(n, k) * rnd(n, k).exp() * mag
    gauss = rnd(n, k)
    sub = rnd(n, k) * 1e-39
    outlier = rnd(n, k) * 1e-6
    outlier[:, :: max(1, b // 2)] = 1e3 * rnd(n, 1).sign()
    ties = torch.zeros(n, k)
    ties[:, 0] = torch.randint(-30, 30, (n,), generator=gen).exp2()
    ties[:, b] = torch.tensor(GRID)[torch.randint(0, 7, (n,), generator=gen)]
    ties[n // 2 :] = ties[n // 2 :] * (torch.arange(k) % 3 > 0)
    cluster = (uni(n, 1) * torch.ones(n, k)) * (1 + 1e-3 * rnd(n, k))
    cluster[:, 0] = 1.0
    cluster[:, b] = 1.0
    s = (1 + torch.randint(0, 8, (n, 1), generator=gen) / 8.0) * 2.0 ** torch.randint(
        -8, 8, (n, 1), generator=gen
    )
    mids = torch.tensor(MIDPOINTS)[torch.randint(0, 7, (n, k), generator=gen)] * s
    mids = _ulps(mids, torch.randint(-3, 4, (n, k), generator=gen))
    mids[:, 0] = 6 * s[:, 0]
    mids[:, b] = _ulps(6 * s[:, 0], torch.randint(-2, 3, (n,), generator=gen))
    kinds = [heavy, gauss, sub, outlier, ties, cluster, mids, mids * 1.000001]
    return [w * torch.where(uni(*w.shape) < 0.5, -1.0, 1.0) for w in kinds]
