"""`mxptq eval`: perplexity of an original and (optionally) a quantized checkpoint on the same
text, and the KL divergence of the quantized model's next-token distributions from the
original's; a W4A4 checkpoint's activation quantization is emulated as served
(runtime/activations.py); optionally with NVFP4 attention emulated in the evaluated model.
Register with `app.command("eval")(eval_command)`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import MxptqError
from .names import SELECTOR_NAMES

console = Console(stderr=True, soft_wrap=True)
TEXT_SUFFIXES = (".txt", ".raw", ".jsonl", ".parquet", ".json")


def load_causal_lm(path: str, what: str, emulate_activations: bool = False):
    """A causal LM in float32 on CPU, in eval mode; one clear line if it cannot be loaded.
    A quantized checkpoint (any dialect we write) goes through mxptq's loader, so the model
    computes with exactly its bytes; transformers' compressed-tensors path would decompress to
    bf16 on CPU and refuse a cast back (docs/runtime.md)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .runtime import load

    try:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "quantization_config", None) is not None:
            model = load(path, dtype=torch.float32, emulate_activations=emulate_activations)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except MxptqError:
        raise
    except Exception as e:
        raise MxptqError(
            f"{what} {path!r} could not be loaded as a causal LM ({type(e).__name__}: "
            f"{_first_line(e)})") from None
    return model.eval()


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def check_quantized(path: str) -> None:
    """Refuse a checkpoint that `mxptq inspect` finds broken (NaN or negative scale bytes, a
    missing tensor, ...): scoring it would give NaN or fail deep inside a forward pass."""
    from .inspect import inspect_checkpoint

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return  # load_causal_lm says what is wrong with it
    if "quantization_config" not in config:
        return  # a dense model (e.g. one changed by hand) is evaluated as it is
    try:
        problems = inspect_checkpoint(Path(path)).problems
    except MxptqError as e:
        raise MxptqError(f"--quantized {path}: {e}") from None
    if problems:
        raise MxptqError(
            f"--quantized {path}: {problems[0]}"
            + (f" (and {len(problems) - 1} more; `mxptq inspect {path}` lists them)"
               if len(problems) > 1 else ""))


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception as e:
        raise MxptqError(
            f"--model {model}: no tokenizer could be loaded from it ({type(e).__name__}: "
            f"{_first_line(e)}); eval tokenizes --data with the original model's tokenizer, "
            "so its folder needs tokenizer.json or tokenizer.model") from None


def load_data(data: str) -> str:
    """The text of --data: a local file, else a `datasets` name (online only)."""
    from .calibration.data import load_text

    path = Path(data).expanduser()
    if path.is_file():
        return load_text(path)
    if path.exists() or "/" in data or path.suffix.lower() in TEXT_SUFFIXES:
        raise MxptqError(f"--data {data}: no such file")
    try:
        return load_text(data)
    except MxptqError:
        raise MxptqError(
            f"--data {data!r}: not a local file, and the datasets library could not load a "
            "data set of that name (offline?); pass a .txt, .jsonl or .parquet file") from None


def run_eval(
    model: str, quantized: str | None, data: str, mode: str, ctx: int,
    emulate_attention: str | None, scale: str, max_sequences: int | None,
) -> dict:
    """The numbers `mxptq eval` prints, as a dict."""
    from .evaluate import MODES, prepare, reference_logprobs, score

    if mode not in MODES:
        raise MxptqError(f"unknown --mode {mode!r} (one of {', '.join(MODES)})")
    if scale not in SELECTOR_NAMES:
        raise MxptqError(f"unknown --scale {scale!r} (one of {', '.join(SELECTOR_NAMES)})")
    if ctx < 2:
        raise MxptqError(f"--ctx {ctx}: must be at least 2 (BOS and one token to predict)")
    if max_sequences is not None and max_sequences < 1:
        raise MxptqError(f"--max-seqs {max_sequences}: must be at least 1")
    from .source import resolve_model

    text = load_data(data)
    src = str(resolve_model(model))  # a GGUF file or a `quant_method: gguf` folder: dense
    tok = load_tokenizer(src)
    try:
        prep = prepare(tok, text, mode, ctx, max_sequences)
    except ValueError as e:
        raise MxptqError(f"--model {model}: {e}") from None
    if not prep.seqs:
        raise MxptqError(f"--data {data}: no text to score")
    test, acts = None, None
    if quantized:
        check_quantized(quantized)
        test = load_causal_lm(quantized, "--quantized", emulate_activations=True)
        iq = getattr(test, "mxptq_input_quant", None)
        if iq is not None:
            acts = iq.describe()
            console.print(f"note: {acts}", markup=False, highlight=False)
    ref = load_causal_lm(src, "--model")
    if emulate_attention:
        from .calibration.attention import use_emulated_attention

        test = test if test is not None else load_causal_lm(src, "--model")
        try:
            use_emulated_attention(test, emulate_attention, scale)
        except ValueError as e:
            raise MxptqError(f"--emulate-attention: {e}") from None
    seqs = prep.seqs
    rows = {"original": {"perplexity": _finite(score(ref, seqs)[0], "--model", model)}}
    if test is not None:
        ppl, kl = score(test, seqs, reference_logprobs(ref, seqs))
        label = "quantized" if quantized else "original"
        label += " (W4A4 activations)" if acts else ""
        label += f" + {emulate_attention} attention" if emulate_attention else ""
        rows[label] = {"perplexity": _finite(ppl, "--quantized", quantized or model),
                       "kl": kl.as_dict()}
    return {
        "model": model, "quantized": quantized, "data": data, "mode": prep.mode, "ctx": ctx,
        "emulate_attention": emulate_attention, "scale": scale if emulate_attention else None,
        "activations": acts,
        "sequences": len(seqs), "tokens": sum(len(s) - 1 for s in seqs),
        "cut_documents": prep.cut_docs, "cut_tokens": prep.cut_tokens,
        "results": rows,
    }


def _finite(r, what: str, path: str) -> dict:
    if not math.isfinite(r.mean):
        raise MxptqError(f"{what} {path}: the model's logits are not finite (NaN or Inf); "
                         f"`mxptq inspect {path}` checks a quantized checkpoint")
    return r.as_dict()


def _table(out: dict) -> Table:
    t = Table(title=f"{out['data']} ({out['mode']}, ctx {out['ctx']})")
    for col in ("model", "perplexity", "mean NLL", "KL vs original", "tokens"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for name, r in out["results"].items():
        p = r["perplexity"]
        kl = f"{r['kl']['value']:.5f}" if "kl" in r else "-"
        t.add_row(name, f"{p['value']:.4f}", f"{p['mean']:.4f}", kl, f"{p['tokens']:,}")
    return t


def _scored_line(out: dict) -> str:
    line = (f"scored {out['tokens']:,} tokens in {out['sequences']:,} sequences "
            f"({out['mode']} mode, ctx {out['ctx']})")
    if out["cut_documents"]:
        line += (f"; {out['cut_documents']:,} documents are longer than ctx - 1 = "
                 f"{out['ctx'] - 1} tokens and their last {out['cut_tokens']:,} tokens are not "
                 "scored (a larger --ctx or --mode stream scores them)")
    return line


def eval_command(
    model: str = typer.Option(
        ..., "--model", metavar="FOLDER|FILE", help="The original (unquantized) model: a folder, "
        "hub id, or .gguf file (or a folder with one); its tokenizer tokenizes --data."),
    quantized: str = typer.Option(
        None, "--quantized", metavar="FOLDER", help="A checkpoint written by mxptq quantize "
        "(any dialect), loaded with mxptq.load so that it computes with exactly its packed "
        "bytes (float32 on CPU); a W4A4 checkpoint's NVFP4 input quantization is emulated as "
        "served. (default: evaluate --model only)"),
    data: str = typer.Option(
        ..., "--data", metavar="TEXT", help="A text file (.txt, .raw, .jsonl or .parquet with a "
        "text field/column) or a datasets name when online (e.g. wikitext-2-raw-v1)."),
    mode: str = typer.Option(
        "auto", "--mode", show_default=False, metavar="[auto|docs|stream]", help="docs: one "
        "sequence per <|endoftext|>-separated document, cut to ctx - 1 tokens; stream: the "
        "whole text in consecutive chunks of ctx - 1 tokens; auto: docs if the text has "
        "<|endoftext|>, else stream. BOS is prepended to every sequence. (default: auto)"),
    ctx: int = typer.Option(
        512, "--ctx", show_default=False, metavar="TOKENS", help="Sequence length including "
        "BOS, at least 2. (default: 512)"),
    max_sequences: int = typer.Option(
        None, "--max-seqs", metavar="N", help="Score only the first N sequences. "
        "(default: all)"),
    emulate_attention: str = typer.Option(
        None, "--emulate-attention", metavar="[nvfp4]", help="Fake-quantize Q, K, V and the "
        "attention probabilities in this format in the evaluated model (--quantized, else a "
        "copy of --model); the original stays exact. Emulation only. (default: off)"),
    scale: str = typer.Option(
        "search", "--scale", show_default=False, metavar="[" + "|".join(SELECTOR_NAMES) + "]",
        help="Block-scale selector for --emulate-attention. (default: search)"),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
) -> None:
    """Perplexity of an original model and (optionally) a quantized checkpoint on the same text,
    and the KL divergence of the quantized model's next-token distributions from the
    original's."""
    try:
        out = run_eval(model, quantized, data, mode, ctx, emulate_attention, scale,
                       max_sequences)
    except MxptqError as e:
        console.print(f"error: {e}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("error: interrupted", markup=False, highlight=False)
        raise typer.Exit(130) from None
    console.print(_scored_line(out), markup=False, highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        Console().print(_table(out))
