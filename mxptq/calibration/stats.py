"""Per-Linear input statistics: E[x²] per input channel, input amax, the GPTQ Hessian and the
block covariances E[x_b x_bᵀ] of each block of B input channels (`--importance hessian`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_COV_TOKENS = 4096  # tokens per step of the block-covariance sum


@dataclass
class LinearStats:
    """Running sums over the tokens a Linear saw: fp64 (E[x²], block covariances) and fp32
    (Hessian). Batches are added in a fixed order (`take`, `merge`), so the sums are the same
    bits however many processes ran the batches."""

    in_features: int
    with_hessian: bool = False
    tokens: int = 0
    sq_sum: torch.Tensor | None = None  # fp64 [K]: Σ x_k²
    amax: float = 0.0
    xtx: torch.Tensor | None = field(default=None, repr=False)  # fp32 [K, K]: Σ x xᵀ
    block: int = 0  # B > 0: also collect the block covariances (K·B sums)
    bxx: torch.Tensor | None = field(default=None, repr=False)  # fp64 [K/B, B, B]: Σ x_b x_bᵀ
    borrowed: int = 0  # of `tokens`, how many are pooled from sibling experts (experts.py)

    @property
    def own_tokens(self) -> int:
        """Tokens this Linear saw itself (0: an unrouted expert)."""
        return self.tokens - self.borrowed

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs [..., K]."""
        x = x.detach().reshape(-1, self.in_features)
        if x.shape[0] == 0:
            return
        xd = x.double()
        sq = (xd * xd).sum(0)
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq.to(self.sq_sum.device)
        self.amax = max(self.amax, float(x.abs().max()))
        if self.with_hessian:
            xf = x.float()
            xtx = xf.T @ xf
            self.xtx = xtx if self.xtx is None else self.xtx + xtx.to(self.xtx.device)
        if self.block and self.in_features % self.block == 0:
            xb = xd.view(-1, self.in_features // self.block, self.block)
            for t in range(0, xb.shape[0], _COV_TOKENS):  # bounds the einsum's transposed copy
                c = xb[t : t + _COV_TOKENS]
                bxx = torch.einsum("tni,tnj->nij", c, c)
                self.bxx = bxx if self.bxx is None else self.bxx + bxx.to(self.bxx.device)
        self.tokens += x.shape[0]

    def take(self) -> LinearStats:
        """What was added since the last take, as statistics of its own; these sums restart
        empty. Calibration sums one forward batch at a time through take and `merge`, so the
        totals are the same sums in the same order whichever process ran each batch."""
        part = LinearStats(self.in_features, self.with_hessian, self.tokens, self.sq_sum,
                           self.amax, self.xtx, self.block, self.bxx)
        self.tokens, self.sq_sum, self.amax, self.xtx, self.bxx = 0, None, 0.0, None, None
        return part

    def merge(self, part: LinearStats) -> None:
        """Add the sums of `part` (one batch's, from `take`)."""
        if part.tokens == 0:
            return
        for name in ("sq_sum", "xtx", "bxx"):
            mine, theirs = getattr(self, name), getattr(part, name)
            if theirs is not None:
                setattr(self, name, theirs if mine is None else mine + theirs.to(mine.device))
        self.amax = max(self.amax, part.amax)
        self.tokens += part.tokens

    def empty_like(self) -> LinearStats:
        """Statistics of the same shape and kind, with nothing added."""
        return LinearStats(self.in_features, self.with_hessian, block=self.block)

    def second_moment(self) -> torch.Tensor:
        """E[x_k²] (fp32 [K]): the per-channel importance for weighted scale selection."""
        if self.sq_sum is None:
            return torch.zeros(self.in_features)
        return (self.sq_sum / self.tokens).float()

    def block_covariance(self) -> torch.Tensor:
        """E[x_b x_bᵀ] per block of B input channels (fp32 [K/B, B, B]): the local Hessian of
        the layer's output error restricted to one block, for `--importance hessian`."""
        if not self.block:
            raise ValueError("statistics were collected without block covariances")
        b = self.block
        if self.bxx is None:
            return torch.zeros(self.in_features // b, b, b)
        return (self.bxx / self.tokens).float()

    def hessian(self) -> torch.Tensor:
        """H = 2/n Σ x xᵀ (fp32 [K, K]), the GPTQ layer-wise Hessian."""
        if not self.with_hessian:
            raise ValueError("statistics were collected without the Hessian")
        if self.xtx is None:
            return torch.zeros(self.in_features, self.in_features)
        return self.xtx * (2.0 / self.tokens)

    def to(self, device: torch.device | str) -> LinearStats:
        """Move the sums (e.g. off the accelerator once a layer is done)."""
        for name in ("sq_sum", "xtx", "bxx"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

