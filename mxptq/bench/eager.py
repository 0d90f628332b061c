"""Eager per-call cost: PackedLinear against a bf16 nn.Linear, host time and wall time.

    python -m mxptq.bench.eager [--m 1,16] [--out FILE.md]

Eager decoding issues one kernel launch per layer call; when the GPU work is a few
microseconds, the host's cost of issuing it decides the step time. For each Llama-3.1-8B
projection shape and token count M, in one run:

- **host us**: wall time to *issue* 100 back-to-back calls (no synchronization inside,
  fewer calls than the launch queue holds), per call, median of 7 repeats: what the Python
  and launch path cost on the host;
- **wall us**: the same 100 calls including the wait for the GPU, per call;
- **ours** is PackedLinear as `model.generate()` calls it (bound launches after the first
  call of a shape), **JIT** the same layer through Triton's autotuner and JIT launcher on
  every call (`packed_forward`, what PackedLinear did before bound launches and still does
  under torch.compile's custom operator), **bf16** an nn.Linear of the dequantized weight.
- **same**: the bound launch's output equals the JIT path's bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import triton
from torch import nn

from mxptq import dequantize, quantize_tensor
from mxptq.kernels import launch
from mxptq.runtime import PackedLinear
from mxptq.runtime.linear import packed_forward

from .gemm import SHAPES


def host_and_wall(fn, calls: int = 100, repeats: int = 7) -> tuple[float, float]:
    """(host us, wall us) per call: issuing `calls` calls, and issuing plus finishing them."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    hosts, walls = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        hosts.append((t1 - t0) / calls * 1e6)
        walls.append((t2 - t0) / calls * 1e6)
    return statistics.median(hosts), statistics.median(walls)


def run(ms: list[int], fmt: str = "nvfp4") -> list[str]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    lines = [
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}",
        "",
        "| N x K | M | bf16 host us | ours host us | ours / bf16 host | JIT host us | "
        "bf16 wall us | ours wall us | JIT wall us | direct | same |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    worst = 0.0
    with torch.no_grad():
        for n, k in SHAPES:
            w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
            qt = quantize_tensor(w, fmt, "absmax", backend="torch")
            packed = PackedLinear.from_quantized(qt)
            dense = nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
            dense.weight.copy_(dequantize(qt, torch.bfloat16))
            args = (packed.codes, packed.scales, packed.global_scale, None, packed.format)
            for m in ms:
                x = torch.randn(1, m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
                same = torch.equal(packed(x), packed_forward(x, *args))
                t_bf16 = host_and_wall(lambda x=x, d=dense: d(x))
                t_ours = host_and_wall(lambda x=x, p=packed: p(x))
                t_jit = host_and_wall(lambda x=x, a=args: packed_forward(x, *a))
                plan = next(iter(packed._plans.values()), None)
                direct = plan is not None and plan.launcher.direct
                worst = max(worst, t_ours[0] / t_bf16[0])
                row = (
                    f"| {n}x{k} | {m} | {t_bf16[0]:.1f} | {t_ours[0]:.1f} | "
                    f"{t_ours[0] / t_bf16[0]:.2f}x | {t_jit[0]:.1f} | {t_bf16[1]:.1f} | "
                    f"{t_ours[1]:.1f} | {t_jit[1]:.1f} | {'yes' if direct else 'no'} | "
                    f"{'yes' if same else 'NO'} |"
                )
                print(row, file=sys.stderr, flush=True)
                lines.append(row)
                packed._plans.clear()
    lines += [
        "",
        f"worst host-time ratio (ours / bf16): {worst:.2f}x; direct launch enabled: "
        f"{launch.direct_launch_enabled()}",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="1,16", help="comma-separated token counts")
    ap.add_argument("--format", default="nvfp4")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("the eager benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    text = "\n".join(run([int(v) for v in a.m.split(",")], a.format))
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
