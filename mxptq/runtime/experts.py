"""`PackedExperts`: transformers 5's fused MoE experts with FP4 weights kept packed.

transformers 5 holds the experts of Qwen3-MoE, Mixtral and their relatives as one module with
3-D parameters `gate_up_proj [E, 2I, H]` (gate rows, then up rows) and `down_proj [E, H, I]`,
and computes, for each expert e and the tokens routed to it, `act(x·gateᵀ) * (x·upᵀ)`, then
`·downᵀ`, scaled by the routing weight and summed over the token's experts
(`Qwen3MoeExperts.forward`, `MixtralExperts.forward`). `PackedExperts` holds the same weights as
stacked packed bytes (the per-expert tensors of the checkpoint, stacked on load) and computes
the same thing:

- **CPU, or a device without the Triton kernels**: the loop of transformers' forward, expert by
  expert, each expert's weight dequantized for the call (fp32, then the activations' dtype):
  bit for bit what transformers computes on the dequantized dense weights.
- **CUDA, up to GROUPED_MAX_PAIRS (token, expert) pairs** (decoding): one GEMV launch for all
  pairs' gate/up rows and one for their down rows (`gemv.fp4_gemv_experts`: row p reads expert
  eid[p]'s weight), no host synchronization, so a decode step can be captured in a CUDA graph;
  the routing weights scale the k expert outputs of a token, which are then summed.
- **CUDA, more pairs** (prefill): transformers' loop, each expert's rows through
  `packed_forward` (the fused kernel, or dequantize + cuBLAS for many tokens).

Gate and up rows of one expert normally share one global scale (mxptq writes them so, as
fused partners); when they do not, gate and up run as two launches over row halves.
Not supported: expert parallelism (the `num_experts` sentinel index), biases, experts whose
activation is not applied as act(gate) * up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import Format, get_format
from ..tensor import QuantizedTensor, dequantize
from .linear import _current_device, _gemm, _raw_stream, packed_forward

try:
    from mxptq.kernels import gemv as _gemv
except ImportError:  # no usable Triton
    _gemv = None

# (token, expert) pairs up to which CUDA calls take the grouped GEMV (16 tokens x top-8)
GROUPED_MAX_PAIRS = 128
_BUFFERS = (
    "gate_up_codes",
    "gate_up_scales",
    "gate_global",
    "up_global",
    "down_codes",
    "down_scales",
    "down_global",
)
_GLOBALS = ("gate_global", "up_global", "down_global")


def fused_experts_shape(mod: nn.Module) -> tuple[int, int, int] | None:
    """(E, H, I) when `mod` is a transformers 5 fused-experts module PackedExperts reproduces:
    3-D `gate_up_proj` [E, 2I, H] (gate rows then up rows) and `down_proj` [E, H, I] used as
    `linear(x, W[e])` (read from the forward's code), act(gate) * up, no bias, not transposed
    or interleaved (transformers' `use_experts_implementation` flags)."""
    from transformers.integrations import moe

    from ..skeleton import expert_layout

    gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor):
        return None
    if gu.dim() != 3 or dn.dim() != 3 or not hasattr(mod, "act_fn"):
        return None
    flags = (
        getattr(mod, "has_gate", True),
        not getattr(mod, "has_bias", False),
        not getattr(mod, "is_transposed", False),
        getattr(mod, "is_concatenated", True),
        not getattr(mod, "has_post_expert_norm", False),
        getattr(type(mod), "_apply_gate", moe._default_apply_gate) is moe._default_apply_gate,
        expert_layout(mod, "gate_up_proj") == "out_in",
        expert_layout(mod, "down_proj") == "out_in",
    )
    e, i2, h = gu.shape
    if not all(flags) or i2 % 2 or tuple(dn.shape) != (e, h, i2 // 2):
        return None
    return e, h, i2 // 2


class PackedExperts(nn.Module):
    """Fused MoE experts (E experts, hidden H, intermediate I) with FP4 weights kept packed.

    Buffers: `gate_up_codes` uint8 [E, 2I, H/2] and `gate_up_scales` [E, 2I, H/B] (gate rows
    then up rows, as transformers' gate_up_proj), `down_codes` [E, H, I/2], `down_scales`
    [E, H, I/B] (float8_e4m3fn for E4M3, else uint8 codes), and for formats with a global scale
    `gate_global`, `up_global`, `down_global` fp32 [E]. `act_fn` is the experts' activation.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        act_fn: nn.Module | None = None,
        format: str | Format = "nvfp4",
        block_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        fmt = get_format(format, block_size)
        b = fmt.block_size
        if hidden_dim % b or intermediate_dim % b:
            raise ValueError(
                f"hidden {hidden_dim} and intermediate {intermediate_dim} must be multiples of "
                f"the block size {b}"
            )
        e, h, i = num_experts, hidden_dim, intermediate_dim
        self.num_experts, self.hidden_dim, self.intermediate_dim = e, h, i
        self.format, self.act_fn = fmt, act_fn if act_fn is not None else nn.SiLU()
        sdt = fmt.scale.torch_dtype or torch.uint8
        u8 = torch.uint8
        self.register_buffer(
            "gate_up_codes", torch.zeros(e, 2 * i, h // 2, dtype=u8, device=device)
        )
        self.register_buffer(
            "gate_up_scales", torch.zeros(e, 2 * i, h // b, dtype=sdt, device=device)
        )
        self.register_buffer("down_codes", torch.zeros(e, h, i // 2, dtype=u8, device=device))
        self.register_buffer("down_scales", torch.zeros(e, h, i // b, dtype=sdt, device=device))
        for name in _GLOBALS:
            g = torch.ones(e, dtype=torch.float32, device=device) if fmt.has_global else None
            self.register_buffer(name, g)
        self._plans: dict[tuple, tuple] = {}
        self._shared: tuple | None = None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_quantized(
        cls,
        gate: list[QuantizedTensor],
        up: list[QuantizedTensor],
        down: list[QuantizedTensor],
        act_fn: nn.Module | None = None,
    ) -> PackedExperts:
        """Stack per-expert QuantizedTensors (gate and up [I, H], down [H, I]; one format)."""
        fmt = gate[0].format
        i, h = gate[0].shape
        mod = cls(len(gate), h, i, act_fn, fmt, device="meta")
        mod.gate_up_codes = torch.stack(
            [torch.cat([g.codes, u.codes]) for g, u in zip(gate, up, strict=True)]
        )
        mod.gate_up_scales = torch.stack(
            [torch.cat([g.scales, u.scales]) for g, u in zip(gate, up, strict=True)]
        )
        mod.down_codes = torch.stack([d.codes for d in down])
        mod.down_scales = torch.stack([d.scales for d in down])
        if fmt.has_global:
            for name, qts in (("gate_global", gate), ("up_global", up), ("down_global", down)):
                setattr(mod, name, torch.stack([q.global_scale.reshape(()).float() for q in qts]))
        return mod

    def expert(self, e: int, which: str) -> QuantizedTensor:
        """Expert e's "gate", "up" or "down" weight as a QuantizedTensor view."""
        i = self.intermediate_dim
        if which == "down":
            return QuantizedTensor(
                self.down_codes[e], self.down_scales[e], self._g("down", e), self.format
            )
        rows = slice(0, i) if which == "gate" else slice(i, 2 * i)
        return QuantizedTensor(
            self.gate_up_codes[e, rows],
            self.gate_up_scales[e, rows],
            self._g(which, e),
            self.format,
        )

    def _g(self, which: str, e: int) -> torch.Tensor | None:
        g = getattr(self, f"{which}_global")
        return None if g is None else g[e]

    def _apply(self, fn, recurse: bool = True):
        """Move the packed bytes but never cast them (as PackedLinear._apply)."""
        keep = {n: getattr(self, n) for n in _BUFFERS if getattr(self, n) is not None}
        self._plans, self._shared = {}, None
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_plans"], state["_shared"] = {}, None  # compiled kernels do not copy or pickle
        return state

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, format={self.format.name}, "
            f"block_size={self.format.block_size}"
        )

    # ---- forward --------------------------------------------------------------------------

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H] (transformers'
        experts interface)."""
        pairs = top_k_index.numel()
        if hidden_states.is_cuda and pairs <= GROUPED_MAX_PAIRS and self._grouped_ok():
            return self._grouped(hidden_states, top_k_index, top_k_weights)
        return self._loop(hidden_states, top_k_index, top_k_weights)

    def _grouped_ok(self) -> bool:
        b = self.format.block_size
        return (
            _gemv is not None
            and b >= 8
            and _gemv.gemv_supported(self.hidden_dim, b)
            and _gemv.gemv_supported(self.intermediate_dim, b)
        )

    def _shared_gate_up(self) -> bool:
        """Whether every expert's gate and up rows share one global scale (then one launch
        covers both). Decided in eager mode (one device sync, cached); a compiled graph traced
        before that takes two launches, which is as exact."""
        g, u = self.gate_global, self.up_global
        if g is None:
            return True
        if torch.compiler.is_compiling():
            return self._shared is not None and self._shared[2]
        if self._shared is None or self._shared[0] is not g or self._shared[1] is not u:
            self._shared = (g, u, bool(torch.equal(g, u)))
        return self._shared[2]

    def _grouped(self, x, top_k_index, top_k_weights) -> torch.Tensor:
        t, k = top_k_index.shape
        eid = top_k_index.reshape(-1)
        i = self.intermediate_dim
        if self._shared_gate_up():
            gu = self._gemv("gate_up", x, eid, k)
        else:
            gu = torch.cat([self._gemv("gate", x, eid, k), self._gemv("up", x, eid, k)], dim=-1)
        h = self.act_fn(gu[:, :i]) * gu[:, i:]
        o = self._gemv("down", h, eid, 1)
        o = o.view(t, k, -1) * top_k_weights.unsqueeze(-1).to(o.dtype)
        return o.sum(dim=1).to(x.dtype)

    def _weights(self, which: str) -> tuple:
        """(codes, scales, global) of the rows `which` names, stacked over the experts."""
        i = self.intermediate_dim
        if which == "down":
            return self.down_codes, self.down_scales, self.down_global
        if which == "gate_up":
            return self.gate_up_codes, self.gate_up_scales, self.gate_global
        rows = slice(0, i) if which == "gate" else slice(i, 2 * i)
        g = self.gate_global if which == "gate" else self.up_global
        return self.gate_up_codes[:, rows], self.gate_up_scales[:, rows], g

    def _gemv(self, which: str, x: torch.Tensor, eid: torch.Tensor, xdiv: int) -> torch.Tensor:
        """out[p] = x[p // xdiv] · W[eid[p]]ᵀ: one operator under torch.compile, else a bound
        launch per input shape (as PackedLinear's plans), else Triton's launcher."""
        codes, scales, g = self._weights(which)
        fmt = self.format
        sc = fmt.scale
        args = (codes, scales.view(torch.uint8), g, fmt.block_size, sc.man_bits, sc.bias)
        if not x.is_cuda:  # the interpreter (tests): no streams, no plans
            return _gemv.fp4_gemv_experts(x.contiguous(), eid.contiguous(), *args, xdiv)
        if torch.compiler.is_compiling():
            return torch.ops.mxptq.experts_gemv(
                x, eid, codes, scales, g, xdiv, fmt.name, fmt.scale.name, fmt.block_size
            )
        bufs = (self.gate_up_codes, self.down_codes, g)
        dev = x.get_device()
        stream = _raw_stream(dev)
        key = (
            which,
            x.shape,
            x.dtype,
            eid.shape,
            dev,
            stream,
            x.data_ptr() % 16,
            eid.data_ptr() % 16,
            x.is_contiguous() and eid.is_contiguous(),
        )
        plan = self._plans.get(key)
        if (
            plan is not None
            and plan[1][0] is bufs[0]
            and plan[1][1] is bufs[1]
            and plan[1][2] is bufs[2]
            and _current_device() == dev
        ):
            out = x.new_empty(plan[2])
            plan[0](stream, x, out, eid)
            return out
        with torch.cuda.device(dev):
            if not key[-1] or torch.cuda.is_current_stream_capturing():
                return _gemv.fp4_gemv_experts(x.contiguous(), eid.contiguous(), *args, xdiv)
            out, launcher = _gemv.planned_experts(x, eid, stream, *args, xdiv)
        self._plans[key] = (launcher, bufs, out.shape)
        return out

    def _loop(self, x, top_k_index, top_k_weights) -> torch.Tensor:
        """transformers' expert loop, each expert's weight dequantized for the call (CPU) or
        run packed (CUDA)."""
        final = torch.zeros_like(x)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit.flatten().tolist():
            if e == self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            cur = x[tok]
            gate, up = self._expert_linear(cur, e, "gate_up").chunk(2, dim=-1)
            h = self._expert_linear(self.act_fn(gate) * up, e, "down")
            h = h * top_k_weights[tok, pos, None]
            final.index_add_(0, tok, h.to(final.dtype))
        return final

    def _expert_linear(self, x: torch.Tensor, e: int, which: str) -> torch.Tensor:
        """x · W_eᵀ for expert e's gate and up rows ("gate_up") or down rows."""
        if which == "down":
            parts = [self.expert(e, "down")]
        elif x.is_cuda and _gemm is not None and self._shared_gate_up():
            parts = [
                QuantizedTensor(
                    self.gate_up_codes[e], self.gate_up_scales[e], self._g("gate", e), self.format
                )
            ]
        else:
            parts = [self.expert(e, "gate"), self.expert(e, "up")]
        if x.is_cuda and _gemm is not None:
            outs = [
                packed_forward(x, q.codes, q.scales, q.global_scale, None, q.format) for q in parts
            ]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        # exactly F.linear on the dequantized weight, as the dense module computes
        return F.linear(x, torch.cat([dequantize(q, x.dtype) for q in parts]))


@torch.library.custom_op("mxptq::experts_gemv", mutates_args=())
def _experts_gemv_op(
    x: torch.Tensor,
    eid: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    xdiv: int,
    format_name: str,
    scale_codec: str,
    block_size: int,
) -> torch.Tensor:
    """`gemv.fp4_gemv_experts` as one operator, so torch.compile keeps it whole and CUDA
    graphs capture its launch."""
    fmt = get_format(
        format_name, block_size, scale=scale_codec, has_global=global_scale is not None
    )
    sc = fmt.scale
    return _gemv.fp4_gemv_experts(
        x.contiguous(),
        eid.contiguous(),
        codes,
        scales.view(torch.uint8),
        global_scale,
        block_size,
        sc.man_bits,
        sc.bias,
        xdiv,
    )


@_experts_gemv_op.register_fake
def _(x, eid, codes, scales, global_scale, xdiv, format_name, scale_codec, block_size):
    return x.new_empty((eid.shape[0], codes.shape[-2]))
