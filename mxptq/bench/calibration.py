"""Quality of the calibration options on stories260K: the table in docs/calibration.md.

Calibrates on TinyStories validation_prefix.txt (random windows, seeded), quantizes every
Linear whose input width 16 divides (q/k/v/o/gate/up; down_proj has K = 172 and stays dense)
layer by layer in sequential mode, and evaluates validation_100.txt in docs mode: perplexity
and mean per-token KL(original ‖ quantized). W4A4 rows also fake-quantize the inputs of the
quantized Linears (dynamic per-16 E4M3 block scales, static global scale 2688/amax from the
calibration); "+ attn" rows emulate NVFP4 Q, K, V and P as well.

    python -m mxptq.bench.calibration [--samples 128] [--seqlen 512] [--threads 1] [--out F.md]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

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
from mxptq.evaluate import reference_logprobs, score, sequences

ASSETS = Path(__file__).resolve().parents[2].parent / "shared" / "assets"
MODEL = ASSETS / "models" / "stories260K"
CALIB = ASSETS / "text" / "tinystories" / "validation_prefix.txt"
EVAL = ASSETS / "text" / "tinystories" / "validation_100.txt"


@dataclass(frozen=True)
class Variant:
    label: str
    opts: CalibOptions
    w4a4: bool = False
    attention: str | None = None  # selector for emulated NVFP4 attention


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


def run_variant(v: Variant, ids: torch.Tensor, seqs, ref) -> dict:
    model = load_model()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--max-seqs", type=int, default=None, help="evaluate the first N stories")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(MODEL)
    ids = load_calibration(CALIB, tok, args.samples, args.seqlen, args.seed)
    seqs = sequences(tok, EVAL, "docs", 512, args.max_seqs)
    base = load_model()
    ref = reference_logprobs(base, seqs)
    base_ppl = score(base, seqs)[0]
    lines = [
        f"stories260K, NVFP4 (E4M3 block scales, B = 16). Calibration: {args.samples} x "
        f"{args.seqlen} tokens of validation_prefix.txt, seed {args.seed}. Eval: "
        f"validation_100.txt docs mode, {base_ppl.sequences} stories, {base_ppl.tokens:,} "
        "tokens. down_proj (K = 172) stays dense in every row.",
        "",
        "| method | scheme | PPL | ΔPPL | KL (nats/token) | quantize s |",
        "|---|---|---:|---:|---:|---:|",
        f"| fp32 original | - | {base_ppl.value:.4f} | - | - | - |",
    ]
    print("\n".join(lines), flush=True)
    for v in variants():
        r = run_variant(v, ids, seqs, ref)
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
