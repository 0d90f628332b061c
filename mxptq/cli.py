"""The `mxptq` command line: thin wrappers that parse, call the library and print."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .eval_cmd import eval_command
from .formats import FORMATS
from .inspect_cmd import inspect_command
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


@app.command("quantize")
def quantize_cmd(
    model: str = typer.Option(
        None, "--model", help="Hub id (org/name, needs the hub or its cache) or local folder "
        "with config.json and *.safetensors. Required (here or in --recipe)."),
    format: str = typer.Option(
        None, "--format", help="nvfp4 | mxfp4 | nvfp4-ue5m3. (default: nvfp4)"),
    scale: str = typer.Option(
        None, "--scale", help="Block-scale selector: absmax | 4over6 | search | exhaustive. "
        "(default: search)"),
    out: Path = typer.Option(  # noqa: B008
        None, "--out", help="Output folder; written as a hidden folder next to it and renamed "
        "when complete. Required (here or in --recipe)."),
    block_size: int = typer.Option(
        None, "--block-size", help="Elements per block scale (4, 8, 16, 32, 64, 128). "
        "(default: the format's, 16 for nvfp4*, 32 for mxfp4)"),
    dialect: str = typer.Option(
        None, "--dialect", help="compressed-tensors | modelopt | native. [default: "
        "compressed-tensors when it can express the format (nvfp4 block 16, mxfp4 block 32), "
        "else native]"),
    ignore: list[str] = typer.Option(  # noqa: B008
        None, "--ignore", help="Keep matching Linear modules dense: a wildcard on the module "
        "name (e.g. '*.mlp.down_proj') or 're:REGEX'. Repeatable. (default: none)"),
    fused_set: list[str] = typer.Option(  # noqa: B008
        None, "--fused-set", help="Leaf names that share one global scale, e.g. "
        "'q_proj,k_proj,v_proj'. Repeatable; the sets given replace the built-in table. "
        "(default: q/k/v, gate/up, w1/w3, q_a/kv_a, query/key/value)"),
    quantize_lm_head: bool = typer.Option(
        None, "--quantize-lm-head/--keep-lm-head", help="Quantize lm_head too. (default: keep)"),
    device: str = typer.Option(
        None, "--device", help="auto | cuda | cpu. (default: auto = cuda when available)"),
    calib: str = typer.Option(
        None, "--calib", help="Calibration text: a local .txt, .jsonl or .parquet (text "
        "field/column) or a datasets name (online only). Needed by --importance, --algo gptq "
        "and --scheme w4a4. (default: none, no calibration)"),
    calib_samples: int = typer.Option(
        None, "--calib-samples", help="Calibration windows. (default: 128)"),
    calib_seqlen: int = typer.Option(
        None, "--calib-seqlen", help="Tokens per calibration window. (default: 2048)"),
    seed: int = typer.Option(
        None, "--seed", help="Seed of the window starts; same seed, same bytes. (default: 0)"),
    importance: bool = typer.Option(
        None, "--importance/--no-importance", help="Selectors minimize the error weighted by "
        "E[x²] of each Linear's input channels. (default: off)"),
    algo: str = typer.Option(
        None, "--algo", help="rtn | gptq: GPTQ error feedback through the layer Hessian. "
        "(default: rtn)"),
    gptq_scales: str = typer.Option(
        None, "--gptq-scales", help="lazy | static: GPTQ picks a group's scale when it reaches "
        "it (lazy) or all up front from the original weights. (default: lazy)"),
    damp: float = typer.Option(
        None, "--damp", help="GPTQ damping: damp x mean(diag H). (default: 0.01)"),
    act_order: bool = typer.Option(
        None, "--act-order/--no-act-order", help="GPTQ visits columns by decreasing diag H. "
        "(default: off)"),
    scheme: str = typer.Option(
        None, "--scheme", help="w4a16 | w4a4: w4a4 also writes static activation global "
        "scales (nvfp4 block 16, compressed-tensors or modelopt). (default: w4a16)"),
    recipe: Path = typer.Option(  # noqa: B008
        None, "--recipe", help="YAML file whose keys are these flags (e.g. recipes/"
        "nvfp4-search.yaml); flags on the command line override it. (default: none)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and stop."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run from its last finished shard "
        "(same flags); the result is byte-identical to an uninterrupted run."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the plan and result as JSON on stdout (no progress bar)."),
) -> None:
    """Quantize a Hugging Face checkpoint to NVFP4 / MXFP4, streaming one shard at a time."""
    from .quantize_cmd import guarded, quantize_main

    cli = {
        "model": model, "format": format, "scale": scale, "out": out,
        "block-size": block_size, "dialect": dialect, "ignore": list(ignore or []),
        "quantize-lm-head": quantize_lm_head, "device": device,
        "fused-set": list(fused_set or []),
        "calib": calib, "calib-samples": calib_samples, "calib-seqlen": calib_seqlen,
        "seed": seed, "importance": importance, "algo": algo, "gptq-scales": gptq_scales,
        "damp": damp, "act-order": act_order, "scheme": scheme,
    }
    guarded(quantize_main, cli, recipe, dry_run, overwrite, resume, as_json)


app.command("inspect")(inspect_command)
app.command("eval")(eval_command)

if __name__ == "__main__":
    app()
