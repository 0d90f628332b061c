"""The `mxptq` command line: thin wrappers that parse, call the library and print.

Nothing here imports torch or transformers at module level: `mxptq --help` and every
command's `--help` start in well under a second; the work imports them when it runs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from . import __version__
from .eval_cmd import eval_command
from .inspect_cmd import inspect_command
from .names import BLOCK_SIZES, DIALECT_NAMES, FORMAT_NAMES, SELECTOR_NAMES

app = typer.Typer(
    help="Offline FP4 (NVFP4 / MXFP4) quantization of Hugging Face models. "
    "`mxptq COMMAND --help` shows each command's options with their defaults.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: E[x²] and [a|b] print as written
    context_settings={"max_content_width": 120},  # click's default stops at 80 columns
)
console = Console()


def _choices(names) -> str:
    return "[" + "|".join(map(str, names)) + "]"


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
    from rich.table import Table

    from .formats import FORMATS
    from .scales import DEFAULT_GLOBAL_NORM, DEFAULT_WINDOW, SELECTORS

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
        None, "--model", metavar="FOLDER|ORG/NAME|GGUF", help="A local model folder "
        "(config.json and *.safetensors), a .gguf file (or a folder with one), or a hub id; a "
        "hub id needs the network or a copy in the hub cache (hf download ORG/NAME --local-dir "
        "DIR where the network is, then --model DIR). Required (here or in --recipe)."),
    format: str = typer.Option(
        None, "--format", metavar=_choices(FORMAT_NAMES), help="nvfp4: E4M3 scale per 16 "
        "weights and an fp32 global scale (vLLM, TensorRT-LLM); nvfp4-ue5m3: unsigned E5M3 "
        "scales, no global scale (research; native dialect); mxfp4: power-of-two E8M0 scale "
        "per 32 weights (OCP MX). (default: nvfp4)"),
    scale: str = typer.Option(
        None, "--scale", metavar=_choices(SELECTOR_NAMES), help="How each block's scale is "
        "chosen. absmax: the block maximum maps to 6 (the usual rule); 4over6: the better of "
        "mapping it to 6 or to 4; search: the lowest-error code in a window around absmax; "
        "exhaustive: every code (slow). `mxptq formats` shows the windows. (default: search)"),
    out: Path = typer.Option(  # noqa: B008
        None, "--out", metavar="FOLDER", help="Output folder; written as a hidden folder next "
        "to it and renamed when complete. Required (here or in --recipe)."),
    block_size: int = typer.Option(
        None, "--block-size", metavar=_choices(BLOCK_SIZES), help="Weights per block scale. "
        "(default: the format's: 16 for nvfp4 and nvfp4-ue5m3, 32 for mxfp4)"),
    dialect: str = typer.Option(
        None, "--dialect", metavar=_choices(DIALECT_NAMES), help="How the checkpoint is "
        "written. compressed-tensors: what vLLM and transformers load (transformers needs pip "
        "install compressed-tensors); modelopt: NVIDIA ModelOpt's layout with "
        "hf_quant_config.json (vLLM's modelopt loader; nvfp4 block 16 only); native: mxptq's "
        "own, for every format and block size (loaded by mxptq.load). "
        "(default: compressed-tensors where it can express the format, i.e. nvfp4 block 16 "
        "and mxfp4 block 32, else native)"),
    ignore: list[str] = typer.Option(  # noqa: B008
        None, "--ignore", metavar="PATTERN", help="Keep matching Linear modules dense: a "
        "wildcard on the module name (e.g. '*.mlp.down_proj') or 're:REGEX'. Repeatable. "
        "(default: none)"),
    fused_set: list[str] = typer.Option(  # noqa: B008
        None, "--fused-set", metavar="LEAF,LEAF,...", help="Leaf names that share one global "
        "scale, e.g. 'q_proj,k_proj,v_proj'. Repeatable; the sets given replace the built-in "
        "table. (default: q/k/v, gate/up, w1/w3, q_a/kv_a, query/key/value)"),
    quantize_lm_head: bool = typer.Option(
        None, "--quantize-lm-head/--keep-lm-head", help="Quantize lm_head too. (default: keep "
        "it dense)"),
    device: str = typer.Option(
        None, "--device", metavar="[auto|cuda|cpu]", help="Where the quantization runs. "
        "(default: auto = cuda when available)"),
    calib: str = typer.Option(
        None, "--calib", metavar="TEXT|generate[:N]", help="Calibration text: a local .txt, "
        ".jsonl or .parquet (text field/column), a datasets name (online only), or "
        "generate[:N]: N windows the model writes itself (N defaults to --calib-samples). "
        "Needed by --importance, --algo gptq and --scheme w4a4. (default: none, no "
        "calibration)"),
    calib_samples: int = typer.Option(
        None, "--calib-samples", metavar="N", help="Calibration windows. (default: 128)"),
    calib_seqlen: int = typer.Option(
        None, "--calib-seqlen", metavar="TOKENS", help="Tokens per calibration window, "
        "clamped to the model's context. (default: 2048)"),
    calib_batch: int = typer.Option(
        None, "--calib-batch", metavar="N", help="Calibration windows per forward pass (the "
        "unit of work each rank takes under torchrun or --gpus). (default: 8)"),
    seed: int = typer.Option(
        None, "--seed", metavar="N", help="Seed of the window starts (or of --calib generate's "
        "sampling); same seed, same bytes. (default: 0)"),
    importance: str = typer.Option(
        None, "--importance", metavar="[none|diag|hessian]", help="What the selectors weight "
        "the block error by: diag, E[x²] of each Linear's input channels; hessian, the full "
        "B x B input covariance of each block, (w - ŵ)ᵀ H_b (w - ŵ). (default: none)"),
    global_search: bool = typer.Option(
        None, "--global-search/--no-global-search", help="Also search each tensor's (each fused "
        "set's, shared) FP32 global scale: 16 values over one octave below the default, each "
        "with the exact block search inside, keeping the least (importance-weighted) block "
        "error; 16x the selector's work. Formats with a global scale only. (default: off)"),
    algo: str = typer.Option(
        None, "--algo", metavar="[rtn|gptq]", help="rtn: round each weight to its nearest "
        "code; gptq: GPTQ error feedback through the layer Hessian (needs --calib). "
        "(default: rtn)"),
    gptq_scales: str = typer.Option(
        None, "--gptq-scales", metavar="[lazy|static]", help="GPTQ picks a group's scale when "
        "it reaches it (lazy) or all up front from the original weights (static). "
        "(default: lazy)"),
    damp: float = typer.Option(
        None, "--damp", metavar="X", help="GPTQ damping: damp x mean(diag H). (default: 0.01)"),
    act_order: bool = typer.Option(
        None, "--act-order/--no-act-order", help="GPTQ visits columns by decreasing diag H. "
        "(default: off)"),
    scheme: str = typer.Option(
        None, "--scheme", metavar="[w4a16|w4a4]", help="w4a16: FP4 weights, activations stay "
        "16-bit; w4a4: also writes static activation global scales (nvfp4 block 16, "
        "compressed-tensors or modelopt; needs --calib). (default: w4a16)"),
    gpus: str = typer.Option(
        None, "--gpus", metavar="LIST|all", help="Spread the work over these GPUs of this "
        "machine (e.g. 0,1,2,3 or all): one process per GPU, as `torchrun --nproc-per-node N "
        "-m mxptq quantize ...` starts; input shards are split between them and the output "
        "is byte-identical to one process; with --algo gptq each layer's GPTQ is split too. "
        "(default: one process)"),
    recipe: Path = typer.Option(  # noqa: B008
        None, "--recipe", metavar="YAML", help="File whose keys are these flags (e.g. recipes/"
        "nvfp4-search.yaml); flags on the command line override it. (default: none)"),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (what is quantized, what is kept and why, "
        "sizes) and stop; nothing is written."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a non-empty --out (swapped only once the new one is "
        "complete); without --resume, also discard an interrupted run's partial output."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run from its last finished "
        "calibration layer and shard (same flags and input; finished shards are re-checked); "
        "the result is byte-identical to an uninterrupted run."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the plan and result as JSON on stdout (no progress bar)."),
) -> None:
    """Quantize a Hugging Face checkpoint to NVFP4 / MXFP4, streaming one shard at a time."""
    from .quantize_cmd import guarded, quantize_main

    if gpus is not None and not dry_run:
        import sys

        from .launch import run_on_gpus

        code = guarded(run_on_gpus, gpus, sys.argv[1:])
        if code is not None:
            raise typer.Exit(code)

    cli = {
        "model": model, "format": format, "scale": scale, "out": out,
        "block-size": block_size, "dialect": dialect, "ignore": list(ignore or []),
        "quantize-lm-head": quantize_lm_head, "device": device,
        "fused-set": list(fused_set or []),
        "calib": calib, "calib-samples": calib_samples, "calib-seqlen": calib_seqlen,
        "calib-batch": calib_batch,
        "seed": seed, "importance": importance, "global-search": global_search, "algo": algo,
        "gptq-scales": gptq_scales,
        "damp": damp, "act-order": act_order, "scheme": scheme,
    }
    guarded(quantize_main, cli, recipe, dry_run, overwrite, resume, as_json)


app.command("inspect")(inspect_command)
app.command("eval")(eval_command)

if __name__ == "__main__":
    app()
