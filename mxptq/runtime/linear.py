"""`PackedLinear`: an nn.Linear replacement that keeps FP4 weights packed.

The module holds exactly the bytes of a QuantizedTensor (codes, block scales, global scale) as
buffers and never stores a dense copy: on CUDA the fused Triton kernel dequantizes tiles in
registers (eager decode-sized calls through a launch bound once per input shape, so a call
costs about what a bf16 nn.Linear call costs on the host); elsewhere the torch path
dequantizes a chunk of rows at a time for each call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import Format, get_format
from ..tensor import QuantizedTensor, dequantize

_PACKED = ("codes", "scales", "global_scale")
# From this many tokens on, CUDA forwards dequantize into a transient bf16 weight and call
# cuBLAS: on the H100 at M = 2048 that costs 1.22-1.28x a bf16 layer, the fused large-tile
# kernel 2.2-2.4x (docs/runtime.md); at M = 128 the two are about even.
DENSE_M_MIN = 1024
_CHUNK_WEIGHTS = 1 << 22  # torch path: rows dequantized per step, so temporaries stay small
# Eager calls of up to this many tokens (decoding) keep a bound launch per input shape (`_Plan`)
PLAN_M_MAX = 64

try:
    from mxptq.kernels import dequantize as _triton_dequantize
    from mxptq.kernels import gemm as _gemm
except ImportError:  # no usable Triton: the torch path serves every device
    _gemm = _triton_dequantize = None

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_current_device = getattr(torch._C, "_cuda_getDevice", None)


def packed_forward(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: Format,
) -> torch.Tensor:
    """x · dequant(W)ᵀ + b for a packed weight: the fused kernel, or dequantize + cuBLAS from
    DENSE_M_MIN tokens, on CUDA; the chunked torch path elsewhere."""
    qt = QuantizedTensor(codes, scales, global_scale, fmt)
    k = codes.shape[1] * 2
    if x.is_cuda and _gemm is not None and _gemm.supported(k, fmt.block_size):
        if x.numel() >= DENSE_M_MIN * k:
            w = _triton_dequantize(qt, x.dtype)  # dropped after this call
            return F.linear(x, w, None if bias is None else bias.to(x.dtype))
        return _gemm.quantized_linear(x, qt, bias)
    return _forward_torch(x, qt, bias)


def _forward_torch(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantize a chunk of rows (fp32, then x's dtype) and multiply; nothing is kept."""
    n, k = qt.shape
    rows = max(1, _CHUNK_WEIGHTS // max(k, 1))
    outs = []
    for r in range(0, n, rows):
        part = QuantizedTensor(
            qt.codes[r : r + rows], qt.scales[r : r + rows], qt.global_scale, qt.format
        )
        b = None if bias is None else bias[r : r + rows].to(x.dtype)
        outs.append(F.linear(x, dequantize(part, x.dtype), b))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class _Plan:
    """A bound launch for one input shape, dtype, device, stream and alignment, and the buffers
    it was bound to (a layer whose buffers were replaced makes a new one)."""

    __slots__ = ("launcher", "out_shape", "codes", "scales", "global_scale", "bias")

    def __init__(self, launcher, out_shape, buffers: dict) -> None:
        self.launcher, self.out_shape = launcher, out_shape
        self.codes, self.scales = buffers["codes"], buffers["scales"]
        self.global_scale, self.bias = buffers["global_scale"], buffers["bias"]


def _plan_key(x: torch.Tensor, dev: int, stream: int) -> tuple:
    """What decides a bound launch: x's shape (M, out shape), dtype, device and stream (the
    split-K buffers are per stream) and 16-byte alignment (the kernel's specialization);
    non-contiguous inputs never get a plan."""
    return (x.shape, x.dtype, dev, stream, x.data_ptr() % 16, x.is_contiguous())


@torch.library.custom_op("mxptq::packed_linear", mutates_args=())
def _packed_linear_op(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    format_name: str,
    scale_codec: str,
    block_size: int,
) -> torch.Tensor:
    """`packed_forward` as one operator, so torch.compile keeps it whole (and CUDA graphs in
    mode="reduce-overhead" remove the per-call launch cost of the Python and Triton layers)."""
    has_global = global_scale is not None
    fmt = get_format(format_name, block_size, scale=scale_codec, has_global=has_global)
    return packed_forward(x, codes, scales, global_scale, bias, fmt)


@_packed_linear_op.register_fake
def _(x, codes, scales, global_scale, bias, format_name, scale_codec, block_size):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


class PackedLinear(nn.Module):
    """y = x · dequant(W)ᵀ + b with W [out_features, in_features] stored as FP4 codes.

    Buffers: `codes` uint8 [N, K/2], `scales` [N, K/B] (float8_e4m3fn for E4M3, else uint8
    codes), `global_scale` fp32 0-d for formats with one, `bias` in `dtype` when asked for.
    An empty module (zeros) can be filled by `load_state_dict` from a checkpoint.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        format: str | Format = "nvfp4",
        block_size: int | None = None,
        bias: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        fmt = get_format(format, block_size)
        if in_features % fmt.block_size:
            raise ValueError(
                f"in_features {in_features} is not a multiple of the block size {fmt.block_size}"
            )
        self.in_features, self.out_features, self.format = in_features, out_features, fmt
        n, k, b = out_features, in_features, fmt.block_size
        sdt = fmt.scale.torch_dtype or torch.uint8
        self.register_buffer("codes", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(n, k // b, dtype=sdt, device=device))
        g = torch.ones((), dtype=torch.float32, device=device) if fmt.has_global else None
        self.register_buffer("global_scale", g)
        self.register_buffer("bias", torch.zeros(n, dtype=dtype, device=device) if bias else None)
        self._plans: dict[tuple, _Plan] = {}

    @classmethod
    def from_quantized(
        cls, qt: QuantizedTensor, bias: torch.Tensor | None = None, dtype=torch.bfloat16
    ) -> PackedLinear:
        """Wrap a QuantizedTensor's bytes (shared, not copied); `bias` is cast to `dtype`."""
        n, k = qt.shape
        if qt.format.has_global != (qt.global_scale is not None):
            raise ValueError(f"{qt.format.name}: global scale presence does not match the format")
        mod = cls(k, n, qt.format, bias=bias is not None, dtype=dtype, device="meta")
        mod.codes, mod.scales, mod.global_scale = qt.codes, qt.scales, qt.global_scale
        if bias is not None:
            mod.bias = bias.detach().to(device=qt.codes.device, dtype=dtype)
        return mod

    def quantized(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor view of this module's buffers."""
        return QuantizedTensor(self.codes, self.scales, self.global_scale, self.format)

    def _apply(self, fn, recurse: bool = True):
        """Let .to()/.cuda() move the packed bytes but never cast them: `model.to(bf16)` would
        otherwise rewrite float8 scales and the fp32 global scale as bf16 values."""
        keep = {n: getattr(self, n) for n in _PACKED if getattr(self, n) is not None}
        self._plans = {}  # bound to the old buffers
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_plans"] = {}  # compiled kernels do not copy or pickle
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque op in the graph (CUDA graphs capture it)
            fmt = self.format
            args = (x, self.codes, self.scales, self.global_scale, self.bias)
            return torch.ops.mxptq.packed_linear(*args, fmt.name, fmt.scale.name, fmt.block_size)
        if x.is_cuda:  # the hot path of eager decoding: a bound launch, nothing else
            dev = x.get_device()
            stream = _raw_stream(dev)
            plan = self._plans.get(_plan_key(x, dev, stream))
            b = self._buffers
            if (
                plan is not None
                and b["codes"] is plan.codes
                and b["scales"] is plan.scales
                and b["global_scale"] is plan.global_scale
                and b["bias"] is plan.bias
                and _current_device() == dev
            ):
                out = x.new_empty(plan.out_shape)
                plan.launcher(stream, x, out)
                return out
            return self._forward_cuda(x, dev, stream)
        return packed_forward(x, self.codes, self.scales, self.global_scale, self.bias, self.format)

    def _forward_cuda(self, x: torch.Tensor, dev: int, stream: int) -> torch.Tensor:
        """A CUDA call without a usable plan: a decode-sized one (contiguous x, up to PLAN_M_MAX
        tokens, a K the kernel takes, not during CUDA-graph capture) runs through Triton once
        and keeps the launch it chose; anything else takes `packed_forward`."""
        args = (self.codes, self.scales, self.global_scale, self.bias)
        k, fmt = self.in_features, self.format
        with torch.cuda.device(dev):
            plannable = (
                _gemm is not None
                and _raw_stream is not None
                and x.is_contiguous()
                and x.dim() >= 1
                and 0 < x.numel() <= PLAN_M_MAX * k
                and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and _gemm.supported(k, fmt.block_size)
                and not torch.cuda.is_current_stream_capturing()
            )
            if not plannable:
                return packed_forward(x, *args, fmt)
            sc = fmt.scale
            out, launcher = _gemm.planned_linear(
                x,
                stream,
                self.codes,
                self.scales.view(torch.uint8),
                self.global_scale,
                self.bias,
                fmt.block_size,
                sc.man_bits,
                sc.bias,
            )
        self._plans[_plan_key(x, dev, stream)] = _Plan(launcher, out.shape, self._buffers)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format.name}, block_size={self.format.block_size}, "
            f"bias={self.bias is not None}"
        )
