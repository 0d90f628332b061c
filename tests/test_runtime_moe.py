"""Fused MoE experts kept packed: `mxptq.load` of tiny random Qwen3-MoE and Mixtral checkpoints
builds PackedExperts whose logits equal a dense model's built from the dequantized weights; the
expert GEMV (one launch for every (token, expert) pair) and the bound launches of the eager hot
path run in the Triton interpreter against their references."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from quant_helpers import dense_state, quantize

import mxptq
from mxptq import dequantize, get_format, quantize_tensor
from mxptq.checkpoint import read_checkpoint
from mxptq.errors import MxptqError
from mxptq.runtime import PackedExperts, PackedLinear, linear_weight_bytes, pack_experts
from mxptq.runtime.loader import _packed_experts

try:
    from mxptq.kernels import gemm, gemv
except ImportError:  # triton missing or broken
    gemm = gemv = None

BF16 = torch.bfloat16
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=128, tie_word_embeddings=False)
ARCHS = {
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
                  dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2)),
}
IDS = torch.tensor([[1, 5, 9, 77, 3, 100, 42, 8], [2, 6, 10, 11, 12, 13, 14, 15]])

pytestmark = pytest.mark.usefixtures("one_thread")


def _make(root, arch):
    cfg_cls, cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    model = cls(cfg_cls(**COMMON, **extra))
    with torch.no_grad():  # heavier tails than the default init, like trained weights
        for p in model.parameters():
            p.mul_(1 + 3 * torch.rand_like(p) ** 8)
    src = root / arch
    model.save_pretrained(src, max_shard_size="40KB")
    return src, cls


CASES = {
    "qwen3_moe-ct-nvfp4": ("qwen3_moe", ("--format", "nvfp4", "--scale", "search")),
    "qwen3_moe-modelopt": ("qwen3_moe", ("--format", "nvfp4", "--dialect", "modelopt")),
    "mixtral-ct-nvfp4": ("mixtral", ("--format", "nvfp4", "--scale", "absmax")),
    "mixtral-ct-mxfp4": ("mixtral", ("--format", "mxfp4", "--scale", "search")),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_moe_loads_packed_and_matches_dense(tmp_path, case):
    """Every fused experts module becomes PackedExperts holding the checkpoint's bytes; logits
    (bf16, CPU) equal those of the source model with every quantized weight replaced by its
    dequantized value, bit for bit (transformers' eager expert loop, which PackedExperts
    follows on CPU; its default grouped_mm sums in another order); the experts take at most
    0.3x their bf16 bytes."""
    arch, args = CASES[case]
    src, cls = _make(tmp_path, arch)
    out = tmp_path / "q"
    quantize(src, out, *args)
    model = mxptq.load(out, dtype=BF16).eval()
    experts = {n: m for n, m in model.named_modules() if isinstance(m, PackedExperts)}
    assert len(experts) == COMMON["num_hidden_layers"]
    assert not any(hasattr(m, "gate_up_proj") for m in model.modules())
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    q = read_checkpoint(out)
    name, mod = next(iter(experts.items()))
    base = name.replace("model.", "", 1)
    stored = {k.replace("block_sparse_moe", "mlp"): v for k, v in q.items()}
    leaves = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for e in range(mod.num_experts):
        for leaf, which in zip(leaves, ("gate", "up", "down"), strict=True):
            qt = stored[f"model.{base}.{e}.{leaf}"]
            got = mod.expert(e, which)
            assert torch.equal(got.codes, qt.codes)
            assert torch.equal(got.scales.view(torch.uint8), qt.scales.view(torch.uint8))
            if qt.global_scale is not None:
                assert torch.equal(got.global_scale.reshape(()), qt.global_scale.reshape(()))
    ref = cls.from_pretrained(src, dtype=BF16, experts_implementation="eager").eval()
    ref.load_state_dict(dense_state(ref, out))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
    mem = linear_weight_bytes(model, experts_only=True)
    assert mem.ratio <= 0.3
    assert mem.bf16_bytes == 2 * 3 * 4 * COMMON["hidden_size"] * mod.intermediate_dim * 2


def test_partially_packed_or_unknown_experts_are_refused():
    cfg_cls, cls, extra = ARCHS["qwen3_moe"]
    with torch.device("meta"):
        model = cls(cfg_cls(**COMMON, **extra))
    full = {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(2) for e in range(4)
            for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(_packed_experts(model, full)) == {f"model.layers.{i}.mlp.experts" for i in range(2)}
    assert _packed_experts(model, set()) == {}
    with pytest.raises(MxptqError, match="11 of its 12 expert projections"):
        _packed_experts(model, full - {"model.layers.1.mlp.experts.3.down_proj"})
    model.model.layers[0].mlp.experts.is_transposed = True  # a layout PackedExperts lacks
    with pytest.raises(MxptqError, match="Qwen3MoeExperts is not"):
        _packed_experts(model, full)


def _stack(e, n, k, fmt, seed):
    gen = torch.Generator().manual_seed(seed)
    qts = [quantize_tensor(torch.randn(n, k, generator=gen) * (1 + i), fmt, "absmax",
                           backend="torch") for i in range(e)]
    codes = torch.stack([q.codes for q in qts])
    scales = torch.stack([q.scales for q in qts]).view(torch.uint8)
    g = torch.stack([q.global_scale.reshape(()) for q in qts]) if fmt.has_global else None
    return qts, codes, scales, g


needs_triton = pytest.mark.skipif(gemv is None, reason="triton is not importable")


@needs_triton
@pytest.mark.parametrize(("name", "block", "split"), [("nvfp4", 16, 1), ("nvfp4", 16, 2),
                                                      ("mxfp4", 32, 1)])
def test_experts_gemv_matches_each_expert(name, block, split):
    """Row p of the expert GEMV is x[p // xdiv] times expert eid[p]'s weight: repeated and
    unordered experts, ragged N, split-K, and expert stacks viewed by row halves (a stride
    other than N·K/2 between experts)."""
    fmt = get_format(name, block)
    qts, codes, scales, g = _stack(5, 24, 128, fmt, seed=block + split)
    eid = torch.tensor([3, 0, 3, 4, 1, 1])
    cfg = gemv.GemvConfig(8, 64, 1, split=split)
    sc = fmt.scale
    for dtype in (torch.float32, BF16):
        x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
        out = gemv.fp4_gemv_experts(x, eid, codes, scales, g, block, sc.man_bits, sc.bias, 2, cfg)
        for p, e in enumerate(eid.tolist()):
            ref = F.linear(x[p // 2].double(), dequantize(qts[e]).double())
            tol = 1e-6 if dtype == torch.float32 else 8e-3
            assert float((out[p].double() - ref).norm() / ref.norm()) < tol, (dtype, p)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(2))
    half = gemv.fp4_gemv_experts(x, eid, codes[:, 12:], scales[:, 12:], g, block, sc.man_bits,
                                 sc.bias, 1, cfg)
    full = gemv.fp4_gemv_experts(x, eid, codes, scales, g, block, sc.man_bits, sc.bias, 1, cfg)
    assert torch.equal(half, full[:, 12:])


@needs_triton
def test_grouped_experts_match_the_loop():
    """PackedExperts' grouped path (the expert GEMV, used on CUDA for decoding) against its
    loop path (transformers' loop on the dequantized weights), fp32, with gate and up sharing
    a global scale and, after an edit, not sharing it (two launches)."""
    cfg_cls, cls, extra = ARCHS["qwen3_moe"]
    torch.manual_seed(0)
    dense = cls(cfg_cls(**COMMON, **extra)).model.layers[0].mlp.experts
    mod = pack_experts(torch.nn.Sequential(dense), "nvfp4")[0]
    assert isinstance(mod, PackedExperts)
    x = torch.randn(5, COMMON["hidden_size"])
    idx = torch.tensor([[0, 2], [1, 2], [3, 0], [2, 3], [1, 0]])
    w = torch.rand(5, 2)
    assert mod._shared_gate_up()
    for shared in (True, False):
        if not shared:
            mod.up_global = mod.up_global * 2
            mod.gate_up_scales = mod.gate_up_scales  # buffers replaced: decided again
        ref = mod._loop(x, idx, w)
        got = mod._grouped(x, idx, w)
        assert mod._shared_gate_up() == shared
        assert float((got - ref).norm() / ref.norm()) < 1e-6


@needs_triton
def test_bound_launches_equal_the_jit_launch():
    """`planned_linear` / `planned_experts` return a Launcher holding every argument but the
    per-call tensors; called again (through the JIT here, as without a GPU) it recomputes the
    first call's result for the GEMV, the dot kernel, and the expert GEMV."""
    fmt = get_format("nvfp4")
    sc = fmt.scale
    qt = quantize_tensor(torch.randn(40, 256), fmt, "absmax", backend="torch")
    bias = torch.randn(40)
    for shape in ((1, 256), (2, 1, 256), (5, 256)):
        x = torch.randn(shape)
        args = (qt.codes, qt.scales.view(torch.uint8), qt.global_scale, bias, 16, sc.man_bits,
                sc.bias)
        out, launcher = gemm.planned_linear(x, 0, *args)
        assert out.shape == (*shape[:-1], 40)
        x2 = torch.randn(shape)
        again = torch.empty_like(out)
        launcher(0, x2, again)
        assert torch.equal(again, gemm.fp4_linear(x2, *args))
    qts, codes, scales, g = _stack(3, 16, 64, fmt, seed=3)
    eid = torch.tensor([2, 0, 2, 1])
    x = torch.randn(2, 64).bfloat16()
    out, launcher = gemv.planned_experts(x, eid, 0, codes, scales, g, 16, sc.man_bits, sc.bias, 2)
    again = torch.empty_like(out)
    launcher(0, x, again, eid)
    assert torch.equal(again, out)
