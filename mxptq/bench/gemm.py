"""W4A16 GEMM benchmark: PackedLinear's fused Triton kernel against bf16 F.linear (cuBLAS).

    python -m mxptq.bench.gemm [--format nvfp4] [--m 1,16,128,2048] [--out FILE.md]

Llama-3.1-8B projection shapes (N x K) at several token counts M, all timed in the same run.
GPU times (bf16, ours, fused, deq+bf16) are medians of CUDA-graph replays (do_bench_cudagraph)
of one call on each of several weight copies, at least 150 MB in all, so L2 (50 MB on the
H100) cannot hold the working set; host launch cost is out, as under CUDA-graph serving.
"eager" columns are plain do_bench (it rewrites L2 before each call) and include the launch.
"ours" is PackedLinear's dispatch, "fused" the Triton kernel alone, "deq+bf16" the unfused
alternative (Triton dequantize to a transient bf16 weight, then cuBLAS). Each case checks the
layer against F.linear on the dequantized bf16 weight (relative error).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from mxptq import QuantizedTensor, dequantize, quantize_tensor
from mxptq.kernels import dequantize as triton_dequantize
from mxptq.kernels import gemm, gemv
from mxptq.runtime import PackedLinear, linear_weight_bytes

SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]  # (N, K) of Llama-3.1-8B


L2_SPILL_BYTES = 150 << 20  # weights touched per timed graph: 3x the H100's 50 MB L2


def _time(fn) -> float:
    """Eager time (us): do_bench median, host launch cost included when it exceeds GPU time."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def _graph_time(fns: list) -> float:
    """GPU time per call (us): a CUDA graph runs each call once, each on its own weight copy,
    so that together they overflow L2 and every weight comes from HBM."""

    def all_calls():
        for f in fns:
            f()

    all_calls()  # autotuning and compilation stay outside the capture
    torch.cuda.synchronize()
    return do_bench_cudagraph(all_calls, rep=100, return_mode="median") * 1e3 / len(fns)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not bool(torch.isfinite(out).all()):
        return float("nan")
    return float((out - ref).norm() / ref.norm())


def _copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (TB/s): the memory ceiling."""
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), return_mode="median") * 1e-3
    return 2 * a.numel() * 4 / t / 1e12


def _chosen(m: int) -> str:
    if m <= gemv.GEMV_M_MAX:
        tuner = gemv._gemv_rows if hasattr(gemv._gemv_rows, "best_config") else gemv._gemv
        c = tuner.best_config
        kw = c.kwargs
        split = f" split{kw['SPLIT']}" if kw.get("SPLIT", 1) > 1 else ""
        split += " v8" if kw.get("VB") == 8 else ""
        return f"gemv n{kw['BLOCK_N']} k{kw['BLOCK_K']} w{c.num_warps} s{kw['STAGES']}{split}"
    tuner = gemm._small if m <= gemm.SMALL_M_MAX else gemm._large
    c = tuner.best_config
    kw = c.kwargs
    halves = " halves" if kw.get("HALVES") else ""
    split = f" split{kw['SPLIT']}" if kw.get("SPLIT", 1) > 1 else ""
    split += f" u{kw['UNROLL']}" if kw.get("UNROLL", 1) > 1 else ""
    bm = kw.get("BLOCK_M", max(16, triton.next_power_of_2(m)))
    return f"n{kw['BLOCK_N']} m{bm} k{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages}{halves}{split}"


CHECK_FORMATS = [("nvfp4", 16), ("mxfp4", 32), ("nvfp4-ue5m3", 16), ("nvfp4", 4), ("mxfp4", 128)]


def check_formats() -> list[str]:
    """The compiled kernels on every activation dtype, the GEMV and both dot tile families
    (fixed tiles, so no autotuning here), with bias, for several formats."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    lines = []
    for fmt, b in CHECK_FORMATS:
        w = torch.randn(200, 512, device="cuda", generator=gen)
        qt = quantize_tensor(w, fmt, "absmax", block_size=b, backend="torch")
        bias = torch.randn(200, device="cuda", generator=gen)
        bk = max(128, 2 * b)
        configs = [
            (1, gemv.GemvConfig(4, 1024, 4)),
            (2, gemv.GemvConfig(8, 256, 1, 3)),
            (5, gemm.GemmConfig(64, 16, bk, 4, 3, halves=True)),
            (5, gemm.GemmConfig(32, 16, bk, 4, 3)),
            (16, gemm.GemmConfig(32, 16, bk, 2, 3, split=2)),
            (16, gemm.GemmConfig(32, 16, bk, 2, 3, split=2, pairs=False)),
            (300, gemm.GemmConfig(128, 64, max(64, b), 8, 3)),
        ]
        worst = 0.0
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for m, cfg in configs:
                x = torch.randn(m, 512, device="cuda", generator=gen).to(dtype)
                ref = F.linear(x.double(), dequantize(qt).double(), bias.double())
                worst = max(worst, _rel(gemm.quantized_linear(x, qt, bias.to(dtype), cfg), ref))
        lines.append(
            f"check {fmt} B={b}: worst rel err {worst:.1e} (bf16/fp16/fp32, 7 tiles, bias)"
        )
    return lines


def run(fmt: str, ms: list[int]) -> list[str]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    lines = [
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}; copy bandwidth {_copy_bandwidth():.2f} TB/s",
        "",
        "| N x K | M | bf16 us | ours us | speedup | fused us | deq+bf16 us | ours GB/s | "
        "ours eager us | bf16 eager us | rel err | tile |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    layers = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        qt = quantize_tensor(w, fmt, "absmax", backend="torch")
        copies = math.ceil(L2_SPILL_BYTES / (n * k * qt.format.bits_per_weight / 8))
        qts = [qt] + [
            QuantizedTensor(qt.codes.clone(), qt.scales.clone(), qt.global_scale, qt.format)
            for _ in range(copies - 1)
        ]
        packed = [PackedLinear.from_quantized(q) for q in qts]
        dense_w = [w] + [w.clone() for _ in range(copies - 1)]
        layers.append(packed[0])
        dense = dequantize(qt, torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            err = _rel(packed[0](x), F.linear(x, dense))
            t_bf16 = _graph_time([lambda x=x, w=w: F.linear(x, w) for w in dense_w])
            t_ours = _graph_time([lambda x=x, p=p: p(x) for p in packed])
            t_fused = _graph_time([lambda x=x, q=q: gemm.quantized_linear(x, q) for q in qts])
            tile = _chosen(m)
            t_deq = _graph_time(
                [lambda x=x, q=q: F.linear(x, triton_dequantize(q, torch.bfloat16)) for q in qts]
            )
            e_ours = _time(lambda x=x, p=packed[0]: p(x))
            e_bf16 = _time(lambda x=x, w=w: F.linear(x, w))
            gbs = (n * k * qt.format.bits_per_weight / 8 + 2 * m * (k + n)) / t_ours / 1e3
            row = (
                f"| {n}x{k} | {m} | {t_bf16:.1f} | {t_ours:.1f} | {t_bf16 / t_ours:.2f}x | "
                f"{t_fused:.1f} | {t_deq:.1f} | {gbs:.0f} | {e_ours:.1f} | {e_bf16:.1f} | "
                f"{err:.1e} | {tile} |"
            )
            print(row, file=sys.stderr, flush=True)
            lines.append(row)
        del w, dense, dense_w, packed, qts
    mem = linear_weight_bytes(torch.nn.ModuleList(layers))
    lines += [
        "",
        f"memory ({fmt}, these {len(layers)} layers): {mem.bytes / 2**20:.1f} MiB packed vs "
        f"{mem.bf16_bytes / 2**20:.1f} MiB bf16 = {mem.ratio:.4f}x",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--format", default="nvfp4")
    p.add_argument("--m", default="1,16,128,2048", help="comma-separated token counts")
    p.add_argument("--out", help="also write the table to this markdown file")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the GEMM benchmark needs a CUDA device")
    lines = check_formats() + run(a.format, [int(v) for v in a.m.split(",")])
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
