"""`mxptq eval`: perplexity of an original and (optionally) a quantized checkpoint on the same
text, and the KL divergence of the quantized model's next-token distributions from the
original's; optionally with NVFP4 attention emulated in the evaluated model.
Register with `app.command("eval")(eval_command)`."""

from __future__ import annotations

import json
import sys

import torch
import typer
from rich.console import Console
from rich.table import Table

from .errors import MxptqError
from .scales import SELECTORS
from .source import resolve_model

console = Console(stderr=True, soft_wrap=True)


def load_causal_lm(path: str, what: str):
    """A causal LM in float32 on CPU, in eval mode; one clear line if it cannot be loaded.
    A quantized checkpoint (any dialect we write) goes through mxptq's loader, so the model
    computes with exactly its bytes; transformers' compressed-tensors path would decompress to
    bf16 on CPU and refuse a cast back (formats.md §13)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .runtime import load

    try:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "quantization_config", None) is not None:
            model = load(path, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MxptqError(
            f"{what} {path!r} could not be loaded as a causal LM ({type(e).__name__}: {first})"
        ) from None
    return model.eval()


def run_eval(
    model: str, quantized: str | None, data: str, mode: str, ctx: int,
    emulate_attention: str | None, scale: str, max_sequences: int | None,
) -> dict:
    """The numbers `mxptq eval` prints, as a dict."""
    from transformers import AutoTokenizer

    from .evaluate import MODES, reference_logprobs, score, sequences

    if mode not in MODES:
        raise MxptqError(f"unknown --mode {mode!r} (one of {', '.join(MODES)})")
    if scale not in SELECTORS:
        raise MxptqError(f"unknown --scale {scale!r} (one of {', '.join(SELECTORS)})")
    test = load_causal_lm(quantized, "--quantized") if quantized else None
    src = str(resolve_model(model))  # a GGUF file or a `quant_method: gguf` folder: dense
    tok = AutoTokenizer.from_pretrained(src)
    ref = load_causal_lm(src, "--model")
    if emulate_attention:
        from .calibration.attention import use_emulated_attention

        test = test if test is not None else load_causal_lm(src, "--model")
        try:
            use_emulated_attention(test, emulate_attention, scale)
        except ValueError as e:
            raise MxptqError(f"--emulate-attention: {e}") from None
    seqs = sequences(tok, data, mode, ctx, max_sequences)
    rows = {"original": {"perplexity": score(ref, seqs)[0].as_dict()}}
    if test is not None:
        ppl, kl = score(test, seqs, reference_logprobs(ref, seqs))
        label = "quantized" if quantized else "original"
        label += f" + {emulate_attention} attention" if emulate_attention else ""
        rows[label] = {"perplexity": ppl.as_dict(), "kl": kl.as_dict()}
    return {
        "model": model, "quantized": quantized, "data": data, "mode": mode, "ctx": ctx,
        "emulate_attention": emulate_attention, "scale": scale if emulate_attention else None,
        "results": rows,
    }


def _table(out: dict) -> Table:
    t = Table(title=f"{out['data']} ({out['mode']}, ctx {out['ctx']})")
    for col in ("model", "perplexity", "mean NLL", "KL vs original", "tokens"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for name, r in out["results"].items():
        p = r["perplexity"]
        kl = f"{r['kl']['value']:.5f}" if "kl" in r else "-"
        t.add_row(name, f"{p['value']:.4f}", f"{p['mean']:.4f}", kl, f"{p['tokens']:,}")
    return t


def eval_command(
    model: str = typer.Option(..., "--model", help="Original checkpoint: local folder, hub "
                              "id, or .gguf file (or a folder with one)."),
    quantized: str = typer.Option(
        None, "--quantized", help="Quantized checkpoint folder, loaded with transformers' "
        "AutoModelForCausalLM (cast to float32). (default: evaluate --model only)"),
    data: str = typer.Option(
        ..., "--data", help="Text file (.txt/.jsonl/.parquet) or a datasets name when online "
        "(e.g. wikitext-2-raw-v1)."),
    mode: str = typer.Option(
        "docs", "--mode", help="docs: one sequence per <|endoftext|>-separated document; "
        "stream: consecutive chunks of ctx-1 tokens. BOS is prepended in both."),
    ctx: int = typer.Option(512, "--ctx", help="Sequence length including BOS."),
    max_sequences: int = typer.Option(
        None, "--max-seqs", help="Score only the first N sequences. (default: all)"),
    emulate_attention: str = typer.Option(
        None, "--emulate-attention", help="Fake-quantize Q, K, V and the attention "
        "probabilities in this format (nvfp4) in the evaluated model (--quantized, else a copy "
        "of --model); the original stays exact. Emulation only."),
    scale: str = typer.Option(
        "search", "--scale", help="Block-scale selector for --emulate-attention."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
) -> None:
    """Perplexity and KL divergence of an original vs a quantized checkpoint."""
    try:
        out = run_eval(model, quantized, data, mode, ctx, emulate_attention, scale,
                       max_sequences)
    except MxptqError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        Console().print(_table(out))
