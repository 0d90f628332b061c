"""Wall time and peak GPU memory of calibration + GPTQ on a synthetic Llama-3.1-8B.

    python -m mxptq.bench.calibration_speed --dir /tmp/mxptq-calib [--samples 128 --seqlen 2048]
        [--importance none|diag|hessian] [--global-search]

Generates the bf16 checkpoint of mxptq.bench.pipeline (Llama-3.1-8B names and shapes, heavy-tailed
values, four shards), then runs what `mxptq quantize --calib ... --algo gptq --scale search` runs
before streaming: `calibrate` one decoder layer at a time with Hessians, and `quantize_layer` (GPTQ
with lazily searched NVFP4 block scales) as its per-layer callback, on random token ids (the
model's weights are random too, so real text would tell nothing more). One line per layer goes to
stdout and to --log as it finishes, so an interrupted run still shows its rate. On a GPU it first
checks that GPTQ's Triton column blocks give the torch loop's bytes on a slice of a real-sized
layer, and times both (with `--importance hessian`, also the lazy group selection on block
covariances and the Triton quantizer with covariances).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mxptq.bench.pipeline import LLAMA_8B, generate
from mxptq.calibration import CalibOptions, LinearStats, calibrate, gptq_quantize, quantize_layer
from mxptq.tensor import quantize_tensor

TINY = dict(vocab=1024, hidden=256, inter=512, layers=2, heads=4, kv_heads=2)


def check_kernel(rows: int = 512, k: int = 2048, importance: str = "diag") -> dict:
    """GPTQ (search, lazy scales, importance) on one [rows, k] GPU weight by both backends."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(rows, k, device="cuda", generator=gen) * 0.02
    x = torch.randn(4 * k, k, device="cuda", generator=gen)
    x = x * torch.linspace(0.2, 3, k, device="cuda")
    h = x.T @ x * (2 / x.shape[0])
    imp = h.diagonal() / 2
    extra = {}
    if importance == "hessian":
        st = LinearStats(k, block=16)
        st.add(x)
        imp = st.block_covariance().cuda()
        q = {b: quantize_tensor(w, "nvfp4", "search", importance=imp, backend=b)
             for b in ("torch", "triton")}
        extra["check_quantize_hessian_bytes_equal"] = (
            torch.equal(q["torch"].codes, q["triton"].codes)
            and torch.equal(q["torch"].scale_codes(), q["triton"].scale_codes()))
    out, secs = {}, {}
    for backend in ("torch", "triton", "triton"):  # the second triton run is the timed one
        torch.cuda.synchronize()
        t = time.perf_counter()
        out[backend] = gptq_quantize(w, h, "nvfp4", "search", importance=imp, backend=backend)
        torch.cuda.synchronize()
        secs[backend] = time.perf_counter() - t
    a, b = out["torch"], out["triton"]
    same = (torch.equal(a.qt.codes, b.qt.codes) and torch.equal(a.weight, b.weight)
            and torch.equal(a.qt.scale_codes(), b.qt.scale_codes()))
    return {"check_shape": [rows, k], "check_importance": importance, "check_bytes_equal": same,
            "check_torch_s": round(secs["torch"], 2), "check_triton_s": round(secs["triton"], 3),
            **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=LLAMA_8B["layers"])
    ap.add_argument("--tiny", action="store_true", help="a small model, for a smoke run")
    ap.add_argument("--log", type=Path, default=None, help="also append per-layer lines here")
    ap.add_argument("--importance", default="none", choices=("none", "diag", "hessian"))
    ap.add_argument("--global-search", action="store_true")
    a = ap.parse_args()
    c = dict(TINY if a.tiny else LLAMA_8B, layers=a.layers if not a.tiny else TINY["layers"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = a.dir / "model"
    t0 = time.perf_counter()
    if not (src / "config.json").exists():
        generate(src, "llama-8b", c, shards=4, shard_gib=None)
    t_gen = time.perf_counter() - t0
    ids = torch.randint(0, c["vocab"], (a.samples, a.seqlen),
                        generator=torch.Generator().manual_seed(0))
    opts = CalibOptions(format="nvfp4", scale="search", algo="gptq", importance=a.importance,
                        global_search=a.global_search)
    results: dict = {}
    start = time.perf_counter()

    def say(line: str) -> None:
        print(line, flush=True)
        if a.log:
            with open(a.log, "a") as f:
                f.write(line + "\n")

    def on_layer(run) -> None:
        done = quantize_layer(run, opts)
        results.update({n: qt.to("cpu") for n, qt in done.items()})
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        say(f"layer done: {len(results)} linears, {time.perf_counter() - start:.1f} s, "
            f"peak GPU {peak:.2f} GiB")

    kind = "hessian" if a.importance == "hessian" else "diag"
    check = check_kernel(importance=kind) if device == "cuda" else {}
    if check:
        say(json.dumps(check))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    calibrate(src, ids, device=device, hessian=True, blocks=opts.covariance_block,
              on_layer=on_layer, sequential=True, keep_stats=False)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "model": c, "tokens": a.samples * a.seqlen,
           "generate_s": round(t_gen, 1), "calibrate_gptq_s": round(wall, 1),
           "peak_gpu_gib": round(peak, 2), "linears": len(results),
           "importance": a.importance, "global_search": a.global_search, **check}
    say(json.dumps(out))


if __name__ == "__main__":
    main()
