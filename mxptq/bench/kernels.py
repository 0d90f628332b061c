"""Benchmark of the Triton quantizer on a GPU: `python -m mxptq.bench.kernels`.

For each shape and selector: median time (triton.testing.do_bench), G weights/s, the ratio to
the weight rate of a device-to-device copy of the same bf16 bytes, and a byte-for-byte check
against the torch reference run on the same GPU tensor. Before timing, a small matrix of edge
cases (every format x selector x block size, tiny and huge magnitudes, importance weights) is
checked on the GPU too. Writes a markdown table to $OUT/kernels_bench.md when OUT is set.

`--out PATH` instead measures the issue-21 table (`table_main`): absmax, 4over6, search,
exhaustive by the pruned search and by the certified window, tile/warp variants of absmax
and 4over6, and a copy of the same bytes, all in one run per shape.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import sys
import time

import torch
import triton
import triton.testing
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from mxptq.formats import get_format
from mxptq.scales import SELECTORS, resolve_selector
from mxptq.tensor import quantize_tensor

from ..kernels import quantize, tensor_amax

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (28672, 8192)]
TARGETS = {"absmax": 500, "4over6": 250, "search": 150, "exhaustive": 50}


def heavy_tailed(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Gaussian times a log-normal scale: heavy tails and a wide range of block maxima."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.randn(n, k, device="cuda", generator=gen)
    return (z * torch.randn(n, k, device="cuda", generator=gen).exp()).to(torch.bfloat16)


def same_bytes(a, b) -> bool:
    ok = torch.equal(a.codes, b.codes) and torch.equal(a.scale_codes(), b.scale_codes())
    if a.global_scale is not None:
        ok = ok and torch.equal(a.global_scale.view(torch.int32), b.global_scale.view(torch.int32))
    return ok


def check_edge_cases() -> int:
    """Triton vs torch on the GPU over formats, selectors, block sizes and magnitudes."""
    bad = 0
    fmts = [
        ("nvfp4", {}),
        ("nvfp4-ue5m3", {"has_global": True}),
        ("mxfp4", {}),
        ("mxfp4", {"mx_rule": "ceil"}),
        ("nvfp4", {"scale": "ue5m3-ieee"}),
    ]
    h = torch.rand(256, device="cuda")
    cases = itertools.product(fmts, SELECTORS, (None, 4, 128), (1e-38, 1e-12, 1.0, 1e30))
    for i, ((name, over), sel, b, mag) in enumerate(cases):
        if sel == "4over6" and name == "mxfp4":
            continue
        fmt = get_format(name, b, **over)
        w = heavy_tailed(37, 256, seed=i) * mag
        w[3] = 0
        for imp, floor in ((None, True), (h, False)) if mag == 1.0 else ((None, i % 2 == 0),):
            kw = dict(importance=imp, underflow_floor=floor)
            ref = quantize_tensor(w, fmt, sel, backend="torch", **kw)
            out = quantize_tensor(w, fmt, sel, backend="triton", **kw)
            if not same_bytes(ref, out):
                bad += 1
                print(f"MISMATCH {name} {over} {sel} B={b} mag={mag} h={imp is not None}")
    return bad


def bench_shape(n: int, k: int, selectors, fmt, config=None, check=True) -> list[dict]:
    w = heavy_tailed(n, k)
    dst = torch.empty_like(w)
    t_copy = triton.testing.do_bench(lambda: dst.copy_(w), return_mode="median")
    copy_rate = n * k / t_copy / 1e6
    rows = []
    for sel in selectors:
        cfg = resolve_selector(fmt, sel)
        out = quantize(w, fmt, cfg, None, None, config)
        ok = same_bytes(quantize_tensor(w, fmt, sel, backend="torch"), out) if check else None
        t = triton.testing.do_bench(
            lambda cfg=cfg: quantize(w, fmt, cfg, None, None, config), return_mode="median"
        )
        rate = n * k / t / 1e6
        # The same call replayed from a CUDA graph: GPU time without Python launch overhead.
        t_graph = triton.testing.do_bench_cudagraph(
            lambda cfg=cfg: quantize(w, fmt, cfg, None, None, config), return_mode="median"
        )
        rows.append(
            dict(
                shape=f"{n}x{k}",
                sel=sel,
                ms=t,
                rate=rate,
                copy=copy_rate,
                ratio=rate / copy_rate,
                ok=ok,
                graph=n * k / t_graph / 1e6,
            )
        )
        print(
            f"{n}x{k} {sel:10s} {t * 1e3:9.1f} us {rate:8.1f} G/s copy {copy_rate:7.1f} G/s "
            f"ratio {rate / copy_rate:.3f} bytes_equal={ok}",
            flush=True,
        )
    return rows


def bench(shapes, selectors, fmt_name: str, config=None) -> list[dict]:
    fmt = get_format(fmt_name)
    rows = []
    for n, k in shapes:
        rows += bench_shape(n, k, selectors, fmt, config)
        torch.cuda.empty_cache()
    return rows


def breakdown(fmt_name: str) -> None:
    """Where absmax time goes: the amax pass alone, and the quantizer given the amax."""
    fmt = get_format(fmt_name)
    cfg = resolve_selector(fmt, "absmax")
    for n, k in SHAPES:
        w = heavy_tailed(n, k)
        amax = tensor_amax(w)
        t_amax = triton.testing.do_bench(lambda w=w: tensor_amax(w), return_mode="median")
        t_q = triton.testing.do_bench(
            lambda w=w, amax=amax: quantize(w, fmt, cfg, None, amax), return_mode="median"
        )
        g_amax = triton.testing.do_bench_cudagraph(lambda w=w: tensor_amax(w), return_mode="median")
        g_q = triton.testing.do_bench_cudagraph(
            lambda w=w, amax=amax: quantize(w, fmt, cfg, None, amax), return_mode="median"
        )
        print(
            f"{n}x{k} absmax parts: amax {t_amax * 1e3:.1f} us (graph {g_amax * 1e3:.1f}), "
            f"quantize given amax {t_q * 1e3:.1f} us (graph {g_q * 1e3:.1f})",
            flush=True,
        )


def table(rows: list[dict], fmt_name: str) -> str:
    head = (
        f"| shape | selector ({fmt_name}) | median us | G weights/s | copy G weights/s "
        "| ratio to copy | target G/s | bytes equal | graph replay G/s |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['shape']} | {r['sel']} | {r['ms'] * 1e3:.1f} | {r['rate']:.1f} | {r['copy']:.1f} "
        f"| {r['ratio']:.3f} | {TARGETS[r['sel']]} | {'yes' if r['ok'] else 'NO'} "
        f"| {r['graph']:.1f} |\n"
        for r in rows
    )
    return head + body


# (label, selector, exact path, (weights per program, warps) or None for the default)
KERNELS = [
    ("absmax", "absmax", "window", None),
    ("4over6", "4over6", "window", None),
    ("search", "search", "window", None),
    ("exhaustive, pruned search", "exhaustive", "pruned", None),
    ("exhaustive, certified window", "exhaustive", "window", None),
]
VARIANTS = {
    "absmax": [(2048, 4), (8192, 4), (8192, 8), (16384, 8)],
    "4over6": [(1024, 2), (4096, 4), (4096, 8), (8192, 8)],
    "exhaustive": [(256, 1), (1024, 2), (2048, 4)],
}
TABLE_SHAPES = [(8192, 4096), (8192, 8192), (14336, 8192), (28672, 8192)]
CHECK_ROWS = 64  # rows checked against the torch reference per kernel (all rows between paths)


def _timer(device: str, reps: int):
    """Median ms of a call: do_bench on the GPU; wall clock of `reps` calls on the CPU (the
    interpreter run only tests this module's logic)."""
    if device == "cuda":
        return lambda fn: triton.testing.do_bench(fn, return_mode="median")

    def wall(fn):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall


def _weights(n: int, k: int, device: str) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(n, k, device=device, generator=gen)
    return (z * torch.randn(n, k, device=device, generator=gen).exp()).to(torch.bfloat16)


def table_rows(shapes, fmt_name: str, device: str, reps: int, variants=VARIANTS) -> list[dict]:
    """Every kernel of KERNELS plus the tile variants, per shape, with a copy of the same bf16
    tensor timed in the same run. Bytes: every kernel's first CHECK_ROWS rows against the torch
    reference, the exhaustive paths and each variant against its default on all rows."""
    fmt = get_format(fmt_name)
    bench = _timer(device, reps)
    rows = []
    for n, k in shapes:
        w = _weights(n, k, device)
        dst = torch.empty_like(w)
        copy = n * k / bench(lambda w=w, dst=dst: dst.copy_(w)) / 1e6
        cases = [(lab, sel, win, None) for lab, sel, win, _ in KERNELS]
        for sel, configs in variants.items():
            cases += [(f"{sel} {t}/{nw}", sel, "window", (t, nw)) for t, nw in configs]
        default = {}
        for label, sel, path, config in cases:
            cfg = resolve_selector(fmt, sel)
            call = functools.partial(quantize, w, fmt, cfg, None, None, config, path)
            try:
                out = call()
            except (OutOfResources, CompilationError) as e:  # a tile the compiler rejects
                if config is None:
                    raise
                print(f"{n}x{k} {label}: not run ({type(e).__name__}: {e})", flush=True)
                continue
            head = quantize_tensor(
                w[:CHECK_ROWS], fmt, sel, backend="torch", global_amax=tensor_amax(w)
            )
            ok = same_bytes(head, _head(out, CHECK_ROWS))
            if sel in default:
                ok = ok and same_bytes(default[sel], out)
            else:
                default[sel] = out
            ms = bench(call)
            rate = n * k / ms / 1e6
            rows.append(dict(shape=f"{n}x{k}", kernel=label, ms=ms, rate=rate, copy=copy, ok=ok))
            print(
                f"{n}x{k} {label:30s} {ms * 1e3:9.1f} us {rate:8.2f} G/s copy {copy:8.2f} "
                f"ratio {rate / copy:.3f} bytes_equal={ok}",
                flush=True,
            )
        del w, dst, default
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _head(qt, rows: int):
    """The first `rows` rows of a QuantizedTensor (codes and scales; the same global scale)."""
    return type(qt)(qt.codes[:rows], qt.scales[:rows], qt.global_scale, qt.format)


def markdown(rows: list[dict], fmt_name: str) -> str:
    head = (
        f"| shape | kernel ({fmt_name}) | median us | G weights/s | copy G weights/s "
        "| ratio to copy | bytes equal |\n|---|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['shape']} | {r['kernel']} | {r['ms'] * 1e3:.1f} | {r['rate']:.1f} "
        f"| {r['copy']:.1f} | {r['rate'] / r['copy']:.3f} | {'yes' if r['ok'] else 'NO'} |\n"
        for r in rows
    )


# (format, overrides, block size, importance): the cases of docs/kernels.md's table
CERT_CASES = [
    ("nvfp4", {}, 4, False),
    ("nvfp4", {}, 16, False),
    ("nvfp4", {}, 32, False),
    ("nvfp4", {}, 64, False),
    ("nvfp4", {}, 128, False),
    ("nvfp4", {"has_global": False}, 16, False),
    ("nvfp4-ue5m3", {}, 16, False),
    ("mxfp4", {}, 32, False),
    ("mxfp4", {"mx_rule": "ceil"}, 32, False),
    ("nvfp4", {}, 4, True),
    ("nvfp4", {}, 16, True),
]


def certificate_rates(n_blocks: int = 8192, tile: int = 512) -> str:
    """Markdown: the share of blocks (and of `tile`-weight tiles) that the certified window's
    certificate accepts, by the torch twin on the CPU (bf16 z·exp(z') blocks, global scale where
    the format has one, importance uniform in [0, 1))."""
    from mxptq import scales as S

    gen = torch.Generator().manual_seed(0)
    out = "| format | B | importance | blocks certified | tiles certified |\n"
    out += "|---|---|---|---|---|\n"
    for name, over, b, imp in CERT_CASES:
        fmt = get_format(name, b, **over)
        z = torch.randn(n_blocks, b, generator=gen)
        w = (z * torch.randn(n_blocks, b, generator=gen).exp()).bfloat16().float()
        g = S.global_encode_scale(w.abs().amax(), 448.0) if fmt.has_global else torch.ones(())
        h = torch.rand(1, b, generator=gen) if imp else None
        lo, hi = S.exact_window(fmt, imp)
        table, inv_g, y = fmt.scale.table(), S.reciprocal(g), w * g
        c0 = S.absmax_code(fmt, w.abs().amax(-1), g)
        best_c, best_e = c0, S.block_error(w, y, table[c0], inv_g, h)
        for f in S.candidate_offsets(fmt, S.SelectorConfig("search", (lo, hi)), c0)[1:]:
            c = c0 + f
            valid = (c >= fmt.scale.min_code) & (c <= fmt.scale.max_code)
            e = S.block_error(w, y, table[c.clamp(0, fmt.scale.max_code)], inv_g, h)
            better = valid & (e < best_e)
            best_c, best_e = torch.where(better, c, best_c), torch.where(better, e, best_e)
        ok = S.window_certificate(w, fmt, g, h, c0, best_c, best_e, (lo, hi))
        per = max(1, tile // b)
        tiles = ok[: n_blocks // per * per].view(-1, per).all(-1).float().mean()
        label = name + "".join(f" {k}={v}" for k, v in over.items())
        out += f"| {label} | {b} | {'yes' if imp else 'no'} | {ok.float().mean():.4f} "
        out += f"| {tiles:.4f} |\n"
    return out


def table_main(argv: list[str] | None = None) -> int:
    """The issue-21 table: `python -m mxptq.bench.kernels --out TABLE.md`."""
    ap = argparse.ArgumentParser(description="kernel rates against a copy of the same bytes")
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--format", default="nvfp4")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in TABLE_SHAPES))
    ap.add_argument("--reps", type=int, default=3, help="CPU only: timed calls per kernel")
    ap.add_argument("--no-variants", action="store_true", help="default tiles only")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    variants = {} if args.no_variants else VARIANTS
    rows = table_rows(shapes, args.format, args.device, args.reps, variants)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter)"
    where += f", torch {torch.__version__}, triton {triton.__version__}"
    cmd = "python -m mxptq.bench.kernels " + " ".join(sys.argv[1:] if argv is None else argv)
    text = f"{where}\n\nCommand: `{cmd}`\n\n{markdown(rows, args.format)}"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0 if all(r["ok"] for r in rows) else 1


def main() -> None:
    if any(a == "--out" or a.startswith("--out=") for a in sys.argv[1:]):
        raise SystemExit(table_main())
    if sys.argv[1:] == ["--certificate-rates"]:  # CPU, torch: docs/kernels.md's table
        print(certificate_rates())
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="nvfp4")
    ap.add_argument("--selectors", default=",".join(SELECTORS))
    ap.add_argument("--sweep", action="store_true", help="time (tile, warps) configs, then stop")
    ap.add_argument(
        "--configs",
        default="512:1,1024:2,1024:4,2048:4,4096:4",
        help="tile:warps pairs for --sweep",
    )
    ap.add_argument("--no-edge", action="store_true", help="skip the edge-case check")
    args = ap.parse_args()
    sels = args.selectors.split(",")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if not args.no_edge:
        print(f"edge-case mismatches: {check_edge_cases()}", flush=True)
    if args.sweep:  # tuning only: time (weights per program, warps) configs, then stop
        fmt = get_format(args.format)
        configs = [tuple(map(int, c.split(":"))) for c in args.configs.split(",")]
        for sel, (tile, warps) in itertools.product(sels, configs):
            r = bench_shape(14336, 4096, [sel], fmt, (tile, warps), check=False)[0]
            print(f"SWEEP {sel} tile={tile} warps={warps}: {r['rate']:.1f} G/s", flush=True)
        return
    breakdown(args.format)
    rows = bench(SHAPES, sels, args.format)
    md = table(rows, args.format)
    print(md)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"kernels_bench_{args.format}.md"), "w") as f:
            f.write(
                f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
                f"triton {triton.__version__}\n\n{md}"
            )


if __name__ == "__main__":
    main()
