"""PackedLinear and the fused FP4 GEMM against the definition: F.linear on `dequantize(qt)`.

The Triton cases run the kernel in the interpreter (TRITON_INTERPRET=1 is set before triton is
imported) on small, odd shapes; on a GPU the same kernel is compiled (see mxptq.bench.gemm).
"""

from __future__ import annotations

import copy
import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import KERNEL_FORMATS
from torch import nn

from mxptq import QuantizedTensor, dequantize, get_format, quantize_tensor
from mxptq.runtime import PackedLinear, linear_weight_bytes, pack_linears

try:
    from mxptq.kernels.gemm import GemmConfig, fp4_linear, quantized_linear
except ImportError:  # triton missing or broken: the torch path is still tested
    fp4_linear = None

needs_triton = pytest.mark.skipif(fp4_linear is None, reason="triton is not importable")

FORMATS = KERNEL_FORMATS


def _fmt(name: str, block: int, codec: str | None):
    return get_format(name, block) if codec is None else get_format(name, block, scale=codec)


def _quantized(n: int, k: int, fmt, seed: int = 0) -> QuantizedTensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    return quantize_tensor(w, fmt, "absmax", backend="torch")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize(("name", "block", "codec"), FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_torch_path_matches_dequantized_dense(name, block, codec, dtype, with_bias):
    fmt = _fmt(name, block, codec)
    qt = _quantized(37, 256, fmt)
    bias = torch.randn(37) if with_bias else None
    layer = PackedLinear.from_quantized(qt, bias, dtype=dtype)
    x = torch.randn(2, 5, 256).to(dtype)  # 3-D input, odd M
    out = layer(x)
    ref = F.linear(x, dequantize(qt, dtype), None if bias is None else bias.to(dtype))
    assert out.shape == (2, 5, 37) and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_torch_path_chunks_rows(monkeypatch):
    """Row chunking (a bounded transient) must give the unchunked result."""
    import mxptq.runtime.linear as lin

    qt = _quantized(50, 64, get_format("nvfp4"))
    layer = PackedLinear.from_quantized(qt, torch.randn(50))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    whole = layer(x)
    monkeypatch.setattr(lin, "_CHUNK_WEIGHTS", 64 * 7)
    torch.testing.assert_close(layer(x), whole, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# The Triton kernel in the interpreter.

SMALL = GemmConfig(block_n=16, block_m=16, block_k=64) if fp4_linear else None
LARGE = GemmConfig(block_n=32, block_m=32, block_k=128, num_warps=8) if fp4_linear else None
HALVES = GemmConfig(block_n=16, block_m=16, block_k=64, halves=True) if fp4_linear else None
VARIANTS = {"small": SMALL, "large": LARGE, "halves": HALVES}


def _kernel(x, qt, bias, config):
    return quantized_linear(x, qt, bias, config)


@needs_triton
@pytest.mark.parametrize(("name", "block", "codec"), FORMATS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_triton_kernel_matches_dequantized_dense(name, block, codec, variant):
    fmt = _fmt(name, block, codec)
    config = VARIANTS[variant]
    step = block * (2 if config.halves else 1)
    config = dataclasses.replace(config, block_k=max(config.block_k, step))
    k = 256
    qt = _quantized(45, k, fmt, seed=block)  # N not a multiple of BLOCK_N
    m = 37 if variant == "large" else 3  # M not a multiple of BLOCK_M
    x = torch.randn(m, k)
    ref = F.linear(x.double(), dequantize(qt).double())
    assert _rel(_kernel(x, qt, None, config), ref) < 1e-5


@needs_triton
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_kernel_dtypes_bias_3d(variant, dtype, with_bias):
    config = VARIANTS[variant]
    qt = _quantized(33, 256, get_format("nvfp4"), seed=3)
    bias = torch.randn(33).to(dtype) if with_bias else None
    x = torch.randn(3, 7, 256).to(dtype)
    out = _kernel(x, qt, bias, config)
    b = None if bias is None else bias.double()
    ref = F.linear(x.double(), dequantize(qt).double(), b)
    assert out.shape == (3, 7, 33) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16/fp16: the output's own rounding
    assert _rel(out, ref) < tol


def _random_codes_tensor(fmt, n: int, k: int, lo: int, hi: int, seed: int) -> QuantizedTensor:
    """Every E2M1 code and a range of scale codes, not only what a quantizer would emit."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    sc = torch.randint(lo, hi + 1, (n, k // fmt.block_size), generator=gen, dtype=torch.int32)
    g = torch.tensor(3.7, dtype=torch.float32) if fmt.has_global else None
    return QuantizedTensor(codes, fmt.scale.to_storage(sc), g, fmt)


@needs_triton
@pytest.mark.parametrize(
    ("fmt", "lo", "hi"),
    [
        (get_format("nvfp4"), 0, 126),  # every finite E4M3 code, subnormals included
        (get_format("nvfp4-ue5m3"), 0, 254),
        (get_format("mxfp4"), 100, 160),
    ],
    ids=["e4m3", "ue5m3", "e8m0"],
)
def test_triton_dequant_is_exact_on_every_code(fmt, lo, hi):
    """x = identity reads the weight back: out[m, n] = w[n, m], exact but for the global
    scale's division (one fp32 rounding here, two in the reference)."""
    qt = _random_codes_tensor(fmt, 16, 64, lo, hi, seed=lo + hi)
    out = _kernel(torch.eye(64), qt, None, GemmConfig(16, 16, max(16, fmt.block_size)))
    w = dequantize(qt)
    rtol = 2e-7 if fmt.has_global else 0.0
    torch.testing.assert_close(out, w.T, rtol=rtol, atol=0)


@needs_triton
def test_triton_rejects_bad_tile():
    qt = _quantized(16, 64, get_format("nvfp4"))
    with pytest.raises(ValueError, match="BLOCK_K"):
        _kernel(torch.randn(2, 64), qt, None, GemmConfig(16, 16, 16, halves=True))


@needs_triton
def test_triton_default_dispatch_both_sides_of_small_m():
    qt = _quantized(20, 128, get_format("mxfp4"), seed=9)
    for m in (1, 70):
        x = torch.randn(m, 128)
        ref = F.linear(x.double(), dequantize(qt).double())
        assert _rel(_kernel(x, qt, None, None), ref) < 1e-5


# ------------------------------------------------------------------------------------------
# The module: loading, dtype moves, memory.


def test_empty_module_loads_state_dict():
    qt = _quantized(24, 64, get_format("nvfp4"))
    src = PackedLinear.from_quantized(qt, torch.randn(24))
    dst = PackedLinear(64, 24, "nvfp4", bias=True)
    dst.load_state_dict(src.state_dict())
    assert set(src.state_dict()) == {"codes", "scales", "global_scale", "bias"}
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_dtype_cast_keeps_packed_bytes():
    qt = _quantized(24, 64, get_format("nvfp4"))
    layer = PackedLinear.from_quantized(qt, torch.randn(24), dtype=torch.float32)
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float8_e4m3fn
    assert layer.global_scale.dtype == torch.float32
    assert torch.equal(layer.global_scale, qt.global_scale)
    assert layer.bias.dtype == torch.bfloat16


def test_rejects_mismatched_global():
    qt = _quantized(8, 32, get_format("nvfp4"))
    with pytest.raises(ValueError, match="global scale"):
        PackedLinear.from_quantized(QuantizedTensor(qt.codes, qt.scales, None, qt.format))


def _tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def test_tiny_llama_memory_and_logits():
    model = _tiny_llama()
    dense = copy.deepcopy(model)
    before = linear_weight_bytes(model)
    pack_linears(model, "nvfp4", "absmax")
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert len(packed) == 2 * 7 and not isinstance(model.lm_head, PackedLinear)
    for name, mod in packed.items():  # the reference: the same weights, stored dense
        dense.get_submodule(name).weight.data = dequantize(mod.quantized(), torch.bfloat16)

    skip_head = sum(mod.codes.shape[0] * mod.in_features * 2 for mod in packed.values())
    after = linear_weight_bytes(model)
    assert before.bf16_bytes == after.bf16_bytes
    head = 2 * model.lm_head.weight.numel()
    ratio = (after.bytes - head) / skip_head
    assert ratio <= 0.3
    assert abs(ratio - (0.5 + 1 / 16) / 2) < 1e-3  # 4-bit codes + one E4M3 byte per 16

    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        got, want = model(ids).logits, dense(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# torch.compile: PackedLinear is one custom operator in the graph.


@pytest.mark.parametrize(
    ("name", "block", "codec"),
    [("nvfp4", 16, None), ("mxfp4", 32, None), ("nvfp4-ue5m3", 16, "ue5m3-ieee")],
)
def test_compiled_layer_is_one_op_and_matches_eager(name, block, codec):
    """fullgraph=True: dynamo traces PackedLinear into `mxptq::packed_linear` (no graph break),
    and the compiled layer gives the eager bytes; opcheck validates the op's fake (meta)
    implementation and its registration (the schema check cannot read float8 scales)."""
    fmt = _fmt(name, block, codec)
    qt = _quantized(40, 64, fmt, seed=2)
    layer = PackedLinear.from_quantized(qt, torch.randn(40))
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    assert torch.equal(compiled(x), layer(x))
    assert seen == [torch.ops.mxptq.packed_linear]
    args = (x, layer.codes, layer.scales, layer.global_scale, layer.bias, fmt.name)
    args += (fmt.scale.name, block)
    tests = ("test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration")
    if fmt.scale.torch_dtype is None:
        tests = ("test_schema", *tests)
    torch.library.opcheck(torch.ops.mxptq.packed_linear.default, args, test_utils=tests)


def test_compiled_tiny_llama_has_no_graph_break():
    """A packed transformers Llama compiles whole (fullgraph): one custom op per packed
    linear, the same logits as eager."""
    model = _tiny_llama()
    pack_linears(model, "nvfp4", "absmax")
    ops = []

    def backend(gm, example_inputs):
        ops.extend(n.target for n in gm.graph.nodes if n.target == torch.ops.mxptq.packed_linear)
        return gm

    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
    assert len(ops) == 2 * 7
    torch.testing.assert_close(got, want, rtol=0, atol=0)
