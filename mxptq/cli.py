"""The `mxptq` command line: thin wrappers that parse, call the library and print."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .formats import FORMATS
from .scales import DEFAULT_GLOBAL_NORM, DEFAULT_WINDOW, SELECTORS

app = typer.Typer(
    help="Offline FP4 (NVFP4 / MXFP4) quantization of Hugging Face models.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"mxptq {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Offline FP4 (NVFP4 / MXFP4) quantization of Hugging Face models."""


@app.command("formats")
def formats_cmd() -> None:
    """List the formats and scale selectors with their defaults."""
    t = Table(title="formats")
    for col in ("format", "element", "scale", "block", "global scale", "bits/weight"):
        t.add_column(col)
    for f in FORMATS.values():
        t.add_row(
            f.name, "E2M1", f.scale.name.upper(), str(f.block_size),
            "fp32" if f.has_global else "none", f"{f.bits_per_weight:.2f}",
        )
    console.print(t)
    s = Table(title="scale selectors")
    for col in ("--scale", "candidates", "default global norm"):
        s.add_column(col)
    desc = {
        "absmax": "RNE(g·bmax/6), underflow floor on",
        "4over6": "scale-to-6 and scale-to-4, lower error wins",
        "search": "abs-max code + f, f in "
        + ", ".join(f"{k}: {v}" for k, v in DEFAULT_WINDOW.items() if k != "ue5m3-ieee"),
        "exhaustive": "every finite positive scale code",
    }
    for name in SELECTORS:
        s.add_row(name, desc[name], str(DEFAULT_GLOBAL_NORM[name]))
    console.print(s)
