"""`mxptq inspect DIR`: print what a quantized checkpoint holds and exit non-zero, one line per
problem, when it is not intact. Register with `app.command("inspect")(inspect_command)`."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from .errors import MxptqError
from .interrupts import RECEIVED

if TYPE_CHECKING:  # imported when run: `mxptq --help` needs neither (nor torch)
    from .formats import Format
    from .inspect import Inspection

_BAR = 40
_MAX_ROWS = 24  # more distinct scale codes than this are shown per binade
_MAX_PROBLEMS = 20
_ENGINE_NAMES = {"vllm": "vLLM", "sglang": "SGLang", "tensorrt-llm": "TensorRT-LLM",
                 "transformers": "transformers"}


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n:,} B" if n < 2**20 else f"{n / 2**20:,.1f} MiB" if n < 2**30 else \
        f"{n / 2**30:,.2f} GiB"


def _bars(title: str, col: str, rows: list[tuple[str, int]]) -> Table:
    t = Table(title=title)
    for c in (col, "count", "%", ""):
        t.add_column(c, justify="right" if c in ("count", "%") else "left")
    total, top = sum(n for _, n in rows) or 1, max((n for _, n in rows), default=1)
    for label, n in rows:
        t.add_row(label, f"{n:,}", f"{100 * n / total:.1f}", "█" * max(1, round(_BAR * n / top)))
    return t


def _code_rows(hist: Counter, fmt: Format) -> list[tuple[str, int]]:
    """Code (value) rows, or per binade (2^e) when there are too many distinct codes."""
    def value(c: int) -> str:
        try:
            return f"{fmt.scale.value_of(c):.4g}"
        except ValueError:
            return "NaN/Inf"

    if len(hist) <= _MAX_ROWS or not fmt.scale.man_bits:
        return [(f"{c} ({value(c)})", n) for c, n in sorted(hist.items())]
    binades: Counter = Counter()
    for c, n in hist.items():
        binades[c >> fmt.scale.man_bits] += n
    rows = []
    for e, n in sorted(binades.items()):
        lo = e << fmt.scale.man_bits
        rows.append((f"{lo}-{lo + (1 << fmt.scale.man_bits) - 1} ({value(lo)}...)", n))
    return rows


def _summary(ins: Inspection) -> Table:
    f = ins.fmt
    t = Table(title=f"checkpoint {ins.folder}", show_header=False)
    t.add_column("what")
    t.add_column("value")
    total = ins.packed_bytes + ins.dense_bytes
    rows = [
        ("dialect", ins.dialect),
        ("format", f"{f.name}: E2M1 elements, {f.scale.name.upper()} scales, block "
                   f"{f.block_size}, global scale {'fp32' if f.has_global else 'none'}"),
        ("scale selector", ins.selector or "unknown"),
        ("quantized Linear layers", f"{len(ins.layers)} ({ins.weights:,} weights)"),
        ("bits per weight", f"{ins.bits_per_weight:.3f} stored (nominal "
                            f"{f.bits_per_weight:.3f}: 4 + 8/{f.block_size})"),
        ("packed bytes", _size(ins.packed_bytes)),
        ("dense bytes", _size(ins.dense_bytes)),
        ("total", _size(total)),
        ("original", f"{_size(ins.original_bytes)} ({ins.original_dtype or 'dtype unknown'})"),
        ("compression", f"{ins.ratio:.2f}x" if ins.ratio else "?"),
        ("engines", "; ".join(f"{_ENGINE_NAMES[v.engine]} {v.status}" for v in ins.engines)
         + " (--engines says why)"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def _engines(ins: Inspection) -> Table:
    t = Table(title="serving engines (rules read from their source: docs/checkpoints.md)")
    for c in ("engine", "verdict", "why"):
        t.add_column(c, overflow="fold")
    for v in ins.engines:
        t.add_row(_ENGINE_NAMES[v.engine], v.status, v.why or "-")
    return t


def _kept(ins: Inspection) -> Table:
    t = Table(title=f"Linear weights kept dense ({len(ins.kept)})")
    t.add_column("tensor")
    t.add_column("reason")
    for name, reason in sorted(ins.kept.items()):
        t.add_row(name, reason)
    return t


def _layers(ins: Inspection) -> Table:
    t = Table(title="quantized layers")
    t.add_column("layer", overflow="fold")
    for c in ("[N, K]", "bytes", "bits/w", "global", "top code"):
        t.add_column(c)
    for lay in ins.layers:
        top = lay.codes.most_common(1)
        t.add_row(
            lay.name, f"[{lay.shape[0]}, {lay.shape[1]}]", f"{lay.bytes:,}",
            f"{8 * lay.bytes / (lay.shape[0] * lay.shape[1]):.3f}",
            "-" if lay.global_scale is None else f"{lay.global_scale:.6g}",
            str(top[0][0]) if top else "-",
        )
    return t


def print_inspection(ins: Inspection, layers: bool, console: Console,
                     engines: bool = False) -> None:
    if ins.fmt is None:
        return
    console.print(_summary(ins))
    if engines:
        console.print(_engines(ins))
    if ins.kept:
        console.print(_kept(ins))
    if layers:
        console.print(_layers(ins))
    if ins.histogram:
        console.print(_bars("scale codes (all quantized layers)", "code (value)",
                            _code_rows(ins.histogram, ins.fmt)))
    if ins.offsets is not None:
        rows = [(f"{o:+d}", n) for o, n in sorted(ins.offsets.items())]
        console.print(_bars("ScaleSearch offsets (chosen code - abs-max code)", "offset", rows))


def inspect_command(
    folder: Path = typer.Argument(  # noqa: B008
        ..., metavar="FOLDER", help="Checkpoint folder written by mxptq quantize (any "
        "dialect)."),
    layers: bool = typer.Option(False, "--layers", help="Also show every quantized layer."),
    original: Path = typer.Option(  # noqa: B008
        None, "--original", metavar="FOLDER", help="The unquantized model folder: adds the "
        "histogram of ScaleSearch offsets (chosen scale code - abs-max code). (default: none)"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    verify: bool = typer.Option(
        False, "--verify", help="Also re-read every byte against the SHA-256 manifest written "
        "with the checkpoint and name the first tensor of each file that differs. (default: "
        "off; headers, scales and dense tensors are always checked)"),
    engines: bool = typer.Option(
        False, "--engines", help="Also show, per serving engine (vLLM, SGLang, TensorRT-LLM, "
        "transformers), whether it loads this checkpoint and why not."),
) -> None:
    """Summarize a quantized checkpoint and check its integrity (non-zero exit on a problem)."""
    from .inspect import inspect_checkpoint

    try:
        ins = inspect_checkpoint(folder, original, verify)
    except MxptqError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        raise typer.Exit(130) from None
    except Exception as e:
        if RECEIVED:  # a Ctrl-C swallowed by a library resurfaced as this
            print("error: interrupted (Ctrl-C)", file=sys.stderr)
            raise typer.Exit(130) from None
        if os.environ.get("MXPTQ_DEBUG"):
            raise
        print(f"error: internal error: {type(e).__name__}: {e} (MXPTQ_DEBUG=1 shows a "
              "traceback)", file=sys.stderr)
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(ins.to_json(layers), indent=2))
    else:
        print_inspection(ins, layers, Console(), engines)
    for w in ins.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for p in ins.problems[:_MAX_PROBLEMS]:
        print(f"error: {p}", file=sys.stderr)
    if len(ins.problems) > _MAX_PROBLEMS:
        print(f"error: ... and {len(ins.problems) - _MAX_PROBLEMS} more problems (--json lists "
              "all)", file=sys.stderr)
    if ins.problems:
        raise typer.Exit(1)
