"""What calibration's resumable state costs, whether a resumed calibration gives the same GPTQ
bytes on the device, and how fast `--calib generate` writes its windows, on a synthetic
Llama-3.1-8B cut to --layers layers.

    python -m mxptq.bench.calibration_state --dir /tmp/mxptq-state --out OUT [--layers 8]

1. Writes the bf16 checkpoint of mxptq.bench.pipeline (Llama-3.1-8B shapes, heavy-tailed random
   values) with --layers decoder layers.
2. Calibrates it as `mxptq quantize --calib ... --algo gptq` does (random token ids, one layer
   on the GPU at a time, GPTQ per layer) and saves the state at *every* layer boundary
   (`CalibState`, save interval 0; the command saves the hidden states at most once a minute):
   per layer it times the layer (forward, GPTQ) and the state's writes.
3. Resumes from the boundary at the middle layer (the saved hidden states and layer files) and
   checks that the GPTQ bytes of the remaining layers equal the uninterrupted run's.
4. Loads the whole model on the GPU and generates --gen-samples windows of --seqlen tokens with
   `generate_windows` (`--calib generate`), timed; then the first 4 windows again in a batch of
   4, to see whether the batch size changes tokens on this device (bf16 logits may differ).

Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from mxptq.bench.pipeline import LLAMA_8B, generate
from mxptq.calibration import CalibOptions, calibrate, generate_windows, quantize_layer
from mxptq.calibration.generate import load_generator
from mxptq.calibration.state import CalibState

TINY = dict(vocab=1024, hidden=256, inter=512, layers=4, heads=4, kv_heads=2)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def calibrate_with_state(src: Path, ids, device: str, state_dir: Path, n_layers: int, keep_at: int):
    """GPTQ calibration saving every boundary; returns (results, per-layer timings, the hidden
    states file saved at boundary `keep_at`)."""
    opts = CalibOptions(format="nvfp4", scale="search", algo="gptq")
    state = CalibState(state_dir, "bench", n_layers)
    state.every = 0.0
    state.start(ids)
    results, rows = {}, []
    kept = state_dir.parent / f"hidden-at-{keep_at}.safetensors"
    clock = {"t": time.perf_counter()}

    def on_layer(run) -> None:
        done = {n: qt.to("cpu") for n, qt in quantize_layer(run, opts).items()}
        results.update(done)
        _sync(device)
        t = time.perf_counter()
        state.save_layer(run.index, {n: s.to("cpu") for n, s in run.stats.items()}, done)
        rows.append({"layer": run.index, "layer_file_s": time.perf_counter() - t})

    def on_boundary(k: int, hidden) -> None:
        _sync(device)
        t = time.perf_counter()
        state.boundary(k, hidden, force=True)
        if k == keep_at:
            shutil.copy(state_dir / "hidden.safetensors", kept)
        now = time.perf_counter()
        rows[-1]["hidden_s"] = now - t
        rows[-1]["layer_s"] = t - clock["t"] - rows[-1]["layer_file_s"]
        clock["t"] = now

    calibrate(src, ids, device=device, hessian=True, on_layer=on_layer, sequential=True,
              keep_stats=False, on_boundary=on_boundary)
    return results, rows, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="scratch folder (checkpoint, state)")
    ap.add_argument("--out", type=Path, required=True, help="results.json and results.md here")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--gen-samples", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="a small model, for a smoke run")
    a = ap.parse_args()
    c = dict(TINY) if a.tiny else dict(LLAMA_8B, layers=a.layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = a.dir / f"model-{c['layers']}"
    if not (src / "config.json").exists():
        generate(src, "llama-8b", c, shards=2, shard_gib=None)
        if a.tiny:  # Llama-3's BOS/EOS ids are outside the tiny vocabulary
            cfg = json.loads((src / "config.json").read_text())
            cfg.update(bos_token_id=1, eos_token_id=2)
            (src / "config.json").write_text(json.dumps(cfg, indent=2))
    ids = torch.randint(0, c["vocab"], (a.samples, a.seqlen),
                        generator=torch.Generator().manual_seed(0))
    state_dir = a.dir / "state"
    shutil.rmtree(state_dir, ignore_errors=True)
    keep_at = c["layers"] // 2
    t0 = time.perf_counter()
    full, rows, kept = calibrate_with_state(src, ids, device, state_dir, c["layers"], keep_at)
    wall = time.perf_counter() - t0

    # resume at keep_at from the saved hidden states: the remaining layers' bytes must agree
    from safetensors.torch import load_file

    resumed = {}
    opts = CalibOptions(format="nvfp4", scale="search", algo="gptq")
    t = time.perf_counter()
    calibrate(src, ids, device=device, hessian=True, sequential=True, keep_stats=False,
              start=keep_at, hidden=load_file(kept)["hidden"],
              on_layer=lambda run: resumed.update(
                  {n: qt.to("cpu") for n, qt in quantize_layer(run, opts).items()}))
    resume_s = time.perf_counter() - t
    same = sorted(resumed) == sorted(n for n in full if int(n.split(".")[2]) >= keep_at) and all(
        torch.equal(full[n].codes, q.codes) and torch.equal(full[n].scale_codes(), q.scale_codes())
        and torch.equal(full[n].global_scale, q.global_scale) for n, q in resumed.items())

    model = load_generator(src, torch.device(device))
    _sync(device)
    t = time.perf_counter()
    gen = generate_windows(model, a.gen_samples, a.seqlen, seed=0)
    _sync(device)
    gen_s = time.perf_counter() - t
    again = generate_windows(model, min(4, a.gen_samples), a.seqlen, seed=0, batch_rows=4)
    hidden_bytes = a.samples * a.seqlen * c["hidden"] * 4
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("layer_s", "layer_file_s",
                                                             "hidden_s")}
    out = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "model": c, "calib_tokens": a.samples * a.seqlen,
        "calibrate_gptq_with_state_s": round(wall, 1), "per_layer": rows,
        "mean_layer_s": round(mean["layer_s"], 2),
        "mean_layer_file_s": round(mean["layer_file_s"], 3),
        "mean_hidden_save_s": round(mean["hidden_s"], 2),
        "hidden_file_gib": round(hidden_bytes / 2**30, 2),
        "hidden_save_share_of_layer": round(mean["hidden_s"] / mean["layer_s"], 3),
        "resumed_at": keep_at, "resume_s": round(resume_s, 1), "resume_bytes_equal": same,
        "generate_windows": [a.gen_samples, a.seqlen], "generate_s": round(gen_s, 1),
        "generate_tokens_per_s": round(a.gen_samples * (a.seqlen - 1) / gen_s),
        "generate_batch_rows": None,
        "generate_same_in_batch_of_4": bool(torch.equal(gen[: len(again)], again)),
    }
    from mxptq.calibration.generate import rows_per_batch

    elem = next(model.parameters()).element_size()
    out["generate_batch_rows"] = rows_per_batch(model.config, a.seqlen, a.gen_samples,
                                                torch.device(device), elem)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    share = 100 * out["hidden_save_share_of_layer"]
    gen_row = f"generate {a.gen_samples} x {a.seqlen} tokens ({out['generate_batch_rows']} rows"
    md = [f"device: {out['device']}, torch {out['torch']}; synthetic Llama-3.1-8B shapes, "
          f"{c['layers']} layers; {a.samples} x {a.seqlen} calibration tokens", "",
          "| measure | value |", "|---|---|",
          "| GPTQ calibration, state saved at every boundary | "
          f"{out['calibrate_gptq_with_state_s']} s |",
          f"| per layer: calibration + GPTQ (mean) | {out['mean_layer_s']} s |",
          f"| per layer: layer file write (mean) | {out['mean_layer_file_s']} s |",
          f"| per boundary: hidden states write, {out['hidden_file_gib']} GiB (mean) | "
          f"{out['mean_hidden_save_s']} s ({share:.1f}% of a layer) |",
          f"| resumed at layer {keep_at}: GPTQ bytes equal to the uninterrupted run | {same} |",
          f"| {gen_row} per batch) | {out['generate_s']} s, "
          f"{out['generate_tokens_per_s']:,} tokens/s |",
          f"| first 4 windows equal when generated in a batch of 4 | "
          f"{out['generate_same_in_batch_of_4']} |"]
    (a.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
