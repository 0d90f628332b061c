"""Quantization error of every selector: the tables in docs/numerics.md.

    python -m mxptq.bench.numerics [--elements 4194304] [--device cpu|cuda] [--out FILE.md]

Table 1: relative MSE Σ(ŵ−w)²/Σw² on a unit Gaussian and on Student-t(5) data, NVFP4 at
B = 8, 16, 32, 64 and MXFP4 at B = 32, for absmax, 4over6, search at several windows and
exhaustive, with each method's change against absmax measured in the same run.
Table 2: the "Finer is Better" experiment on a narrow Gaussian (σ = 0.005): E4M3 scales
without a global scale, E4M3 with one, and UE5M3 without one, for B = 4 … 128.
Table 3: the measurements behind the defaults (global normalization, search window).
"""

from __future__ import annotations

import argparse
import time

import torch

from mxptq import dequantize, get_format, quantize_tensor

WINDOWS = [(0, 1), (-1, 2), (-3, 4), (-4, 5), (-5, 6), (-7, 8)]


def gaussian(n: int, k: int, gen: torch.Generator, sigma: float = 1.0) -> torch.Tensor:
    return sigma * torch.randn(n, k, generator=gen)


def student_t(n: int, k: int, gen: torch.Generator, nu: int = 5) -> torch.Tensor:
    chi2 = (torch.randn(nu, n, k, generator=gen) ** 2).sum(0)
    return torch.randn(n, k, generator=gen) / torch.sqrt(chi2 / nu)


def rel_mse(w: torch.Tensor, fmt, scale: str, **kw) -> float:
    qt = quantize_tensor(w, fmt, scale, backend="torch", **kw)
    d = dequantize(qt).double() - w.double()
    return float((d * d).sum() / (w.double() ** 2).sum())


def _fmt_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(v: float, base: float) -> str:
    return f"{v * 1e3:.3f} ({(v / base - 1) * 100:+.1f}%)" if v != base else f"{v * 1e3:.3f}"


def table_selectors(data: dict[str, torch.Tensor]) -> list[str]:
    cols = ["absmax", "4over6"] + [f"search [{a},{b}]" for a, b in WINDOWS] + ["exhaustive"]
    lines = [
        "Relative MSE ×1e-3 (change vs absmax). NVFP4: global norm 448 for absmax, search, "
        "exhaustive; 256 for 4over6 (its rule).",
        "",
        _fmt_row(["data", "format", "B"] + cols),
        _fmt_row(["---"] * (3 + len(cols))),
    ]
    for name, w in data.items():
        for b in (8, 16, 32, 64):
            fmt = get_format("nvfp4", b)
            base = rel_mse(w, fmt, "absmax")
            row = [base, rel_mse(w, fmt, "4over6")]
            row += [rel_mse(w, fmt, "search", window=win) for win in WINDOWS]
            row.append(rel_mse(w, fmt, "exhaustive"))
            lines.append(_fmt_row([name, "nvfp4", str(b)] + [_cell(v, base) for v in row]))
        for rule in ("floor", "ceil"):
            fmt = get_format("mxfp4", mx_rule=rule)
            base = rel_mse(w, fmt, "absmax")
            row = [base, float("nan")]
            row += [rel_mse(w, fmt, "search", window=(max(a, -2), min(b, 2))) for a, b in WINDOWS]
            row.append(rel_mse(w, fmt, "exhaustive"))
            cells = [_cell(v, base) if v == v else "n/a" for v in row]
            lines.append(_fmt_row([name, f"mxfp4 ({rule})", "32"] + cells))
    lines.append("")
    lines.append("MXFP4 search windows are clipped to [-2, 2] (E8M0 steps whole binades).")
    return lines


def table_finer(w: torch.Tensor) -> list[str]:
    cols = [
        "E4M3 absmax", "E4M3 absmax+floor", "E4M3 4over6+floor", "E4M3 exhaustive",
        "E4M3+global absmax", "E4M3+global 4over6", "E4M3+global exhaustive",
        "UE5M3 absmax", "UE5M3 exhaustive",
    ]
    lines = [
        "Relative MSE ×1e-3 on a Gaussian with σ = 0.005. E4M3 columns without a global scale "
        "unless marked; UE5M3 without one.",
        "",
        _fmt_row(["B"] + cols),
        _fmt_row(["---"] * (1 + len(cols))),
    ]
    for b in (4, 8, 16, 32, 64, 128):
        ng = get_format("nvfp4", b, has_global=False)
        gl = get_format("nvfp4", b)
        ue = get_format("nvfp4-ue5m3", b)
        row = [
            rel_mse(w, ng, "absmax", underflow_floor=False),
            rel_mse(w, ng, "absmax"),
            rel_mse(w, ng, "4over6"),
            rel_mse(w, ng, "exhaustive"),
            rel_mse(w, gl, "absmax"),
            rel_mse(w, gl, "4over6"),
            rel_mse(w, gl, "exhaustive"),
            rel_mse(w, ue, "absmax"),
            rel_mse(w, ue, "exhaustive"),
        ]
        lines.append(_fmt_row([str(b)] + [f"{v * 1e3:.3f}" for v in row]))
    return lines


def table_defaults(data: dict[str, torch.Tensor]) -> list[str]:
    lines = [
        "NVFP4 B = 16: global normalization 448 vs 256 for each selector, and the underflow "
        "floor (relative MSE ×1e-3).",
        "",
        _fmt_row(["data", "selector", "norm 448", "norm 256", "448, floor off"]),
        _fmt_row(["---"] * 5),
    ]
    fmt = get_format("nvfp4")
    for name, w in data.items():
        for sel in ("absmax", "search", "exhaustive"):
            a = rel_mse(w, fmt, sel, global_norm=448.0)
            b = rel_mse(w, fmt, sel, global_norm=256.0)
            c = rel_mse(w, fmt, sel, global_norm=448.0, underflow_floor=False)
            cells = [f"{v * 1e3:.4f}" for v in (a, b, c)]
            lines.append(_fmt_row([name, sel, *cells]))
        a = rel_mse(w, fmt, "4over6", global_norm=256.0)
        b = rel_mse(w, fmt, "4over6", global_norm=448.0)
        lines.append(_fmt_row([name, "4over6", f"{b * 1e3:.4f} (max block clips)",
                               f"{a * 1e3:.4f}", ""]))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elements", type=int, default=1 << 22)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    k = 4096
    n = max(1, args.elements // k)
    data = {
        "gaussian": gaussian(n, k, gen).to(args.device),
        "student-t(5)": student_t(n, k, gen).to(args.device),
    }
    narrow = gaussian(n, k, gen, sigma=0.005).to(args.device)
    t0 = time.time()
    out = [f"# mxptq numerics benchmark ({n}×{k} = {n * k} elements, seed {args.seed}, "
           f"device {args.device}, torch {torch.__version__})", "", "## Selectors", ""]
    out += table_selectors(data)
    out += ["", "## Finer is Better (σ = 0.005)", ""] + table_finer(narrow)
    out += ["", "## Defaults", ""] + table_defaults(data)
    out += ["", f"Total time {time.time() - t0:.0f} s."]
    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
