"""Throughput of `--importance hessian` next to the diagonal version, on a GPU.

    python -m mxptq.bench.hessian [--shapes 4096x4096,14336x4096,4096x14336] [--reps 5]
        [--no-edge]

For each weight shape (rows x K, bf16 values, random correlated inputs for the statistics):
NVFP4 `search` quantization with no importance, with diagonal importance (E[x²]) and with
block covariances (Triton kernels/hessian.py, and the torch reference on the same GPU), then
one GPTQ layer (lazy scales) with diagonal importance and with covariances. Each Triton result
is compared byte for byte with the torch reference run on the same device. Prints a markdown
table (GB/s counts the bf16 weight read once), then runs an edge-case matrix (every format x
selector, block sizes 4/16/32, tiny to huge magnitudes) unless --no-edge: it comes last because
a cold Triton cache compiles each block-32 covariance kernel for about a minute.
"""

from __future__ import annotations

import argparse
import time

import torch

from mxptq.calibration import LinearStats, gptq_quantize
from mxptq.tensor import quantize_tensor


def _time(fn, reps: int) -> float:
    fn()  # warm-up (compilation)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def _same(a, b) -> bool:
    return torch.equal(a.codes, b.codes) and torch.equal(a.scale_codes(), b.scale_codes())


def edge_matrix() -> tuple[int, int]:
    """(mismatches, cases): Triton vs the torch reference with covariances on the same GPU, for
    every format x selector, block sizes 4/16/32, magnitudes from 1e-30 to 1e30."""
    bad = total = 0
    gen = torch.Generator(device="cuda").manual_seed(1)
    for fmt in ("nvfp4", "nvfp4-ue5m3", "mxfp4"):
        for scale in ("absmax", "4over6", "search", "exhaustive"):
            if fmt == "mxfp4" and scale == "4over6":
                continue
            for bs in (4, 16, 32):
                for mag in (1e-30, 1e-3, 1.0, 1e30):
                    w = torch.randn(33, 128, device="cuda", generator=gen) * mag
                    x = torch.randn(512, 128, device="cuda", generator=gen)
                    st = LinearStats(128, block=bs)
                    st.add(x @ (torch.eye(128, device="cuda") + 0.2 * torch.randn(
                        128, 128, device="cuda", generator=gen)))
                    kw = dict(block_size=bs, importance=st.block_covariance().cuda())
                    a = quantize_tensor(w, fmt, scale, backend="torch", **kw)
                    b = quantize_tensor(w, fmt, scale, backend="triton", **kw)
                    bad += not _same(a, b)
                    total += 1
    return bad, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gptq-rows", type=int, default=4096, help="rows of the GPTQ layer")
    ap.add_argument("--no-edge", action="store_true", help="skip the edge-case matrix")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| shape | what | ms | GB/s | bytes equal to the torch reference |")
    print("|---|---|---:|---:|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
        x = torch.randn(4096, k, device="cuda", generator=gen) * torch.linspace(0.2, 3, k,
                                                                                  device="cuda")
        st = LinearStats(k, True, block=16)
        st.add(x)
        diag, cov = st.second_moment().cuda(), st.block_covariance().cuda()
        gb = n * k * 2 / 1e9
        ref = quantize_tensor(w, "nvfp4", "search", importance=cov, backend="torch")
        cases = [("search", None, "triton", None), ("search + diag", diag, "triton", None),
                 ("search + hessian (Triton)", cov, "triton", ref),
                 ("search + hessian (torch reference)", cov, "torch", None)]
        for label, imp, backend, check in cases:
            def fn(imp=imp, backend=backend, w=w):
                return quantize_tensor(w, "nvfp4", "search", importance=imp, backend=backend)
            s = _time(fn, a.reps)
            eq = "-" if check is None else str(_same(fn(), check))
            print(f"| {n}x{k} | {label} | {s * 1e3:.2f} | {gb / s:.1f} | {eq} |", flush=True)
        if n != a.gptq_rows:
            continue
        h = st.hessian().cuda()
        for label, imp in (("GPTQ lazy + diag", diag), ("GPTQ lazy + hessian", cov)):
            def run(backend, imp=imp, w=w, h=h):
                return gptq_quantize(w.float(), h, "nvfp4", "search", importance=imp,
                                     backend=backend).qt
            s = _time(lambda: run("triton"), 1)
            eq = _same(run("triton"), run("torch"))  # the torch loop: seconds, once
            print(f"| {n}x{k} | {label} (one layer) | {s * 1e3:.1f} | - | {eq} |", flush=True)
    if not a.no_edge:
        bad, total = edge_matrix()
        print(f"\nedge matrix (formats x selectors x block sizes x magnitudes): {bad} mismatches "
              f"in {total} cases", flush=True)


if __name__ == "__main__":
    main()
