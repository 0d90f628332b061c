"""Speed-up of `mxptq quantize` on several GPUs over one, on synthetic checkpoints of real
shapes, with the I/O floor measured in the same run.

Models (`--model`, written once with mxptq.bench.pipeline's generator: real tensor names and
shapes, heavy-tailed random bf16 values, shards of about --shard-gib):
  llama-8b   Llama-3.1-8B (32 layers);
  llama-32b  a 32B dense model in Llama's layout: Qwen2.5-32B's shapes (hidden 5120,
             intermediate 27648, 40 heads, 8 KV heads, vocabulary 152064), --layers of its 64
             (default 32: the whole model is 61 GiB, more than the disk of a one-GPU machine).
A word-level tokenizer and a text of its words are written beside the weights, so that
calibration runs from a text file as a user's would (the weights are random: real text would
tell nothing more).

For 1 GPU and for each count in --counts (the first N GPUs of --gpus), in one run:
  1. weight-only: `mxptq quantize --scale search` (N > 1 through `--gpus`), wall time from
     outside and the report's own total;
  2. calibration + GPTQ (unless --no-calib): the same with `--calib TEXT --algo gptq
     --importance hessian` (batches of windows, GPTQ and the streaming are split over the
     ranks);
  3. the I/O floor for N processes: each reads the input shards `--gpus` would give its rank
     (mxptq.distributed.assign, by bytes) and writes the output's bytes of them with
     safetensors alone, all N at once (wall time including their start-up);
and checks that every N writes the bytes of N = 1 (SHA-256 of every output file). Every run
sees the page cache warm: the checkpoint was just written (or read by the runs before).

    python -m mxptq.bench.distributed --model llama-8b --dir /tmp/mxptq-dist --json-out d8.json
    python -m mxptq.bench.distributed --model llama-8b --gpus 0,1,2,3,4,5,6,7 --counts 2,4,8
    python -m mxptq.bench.distributed --tiny --counts 2   # logic check on the CPU (gloo)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..distributed import assign
from .pipeline import GIB, LLAMA_8B, TINY, generate

# Qwen2.5-32B's config.json, in Llama's layout (the same tensor names as llama-8b)
LLAMA_32B = dict(vocab=152064, hidden=5120, inter=27648, layers=64, heads=40, kv_heads=8)
MODELS = {"llama-8b": LLAMA_8B, "llama-32b": LLAMA_32B}
WORDS = 2000  # tokenizer vocabulary (fewer when the model's is smaller)


def write_tokenizer(folder: Path, words: int) -> None:
    """A word-level tokenizer over w0..w{words-1}, saved the way transformers loads it."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>").save_pretrained(folder)


def write_text(path: Path, tokens: int, words: int) -> None:
    """Words drawn Zipf-like (a Pareto rank), seeded."""
    rng = random.Random(0)
    path.write_text(" ".join(f"w{int(rng.paretovariate(1.2)) % words}" for _ in range(tokens)))


def digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


def quantize(src: Path, out: Path, gpus: list[int] | None, n: int, extra: list[str],
             env: dict) -> tuple[float, dict]:
    """One `mxptq quantize` on n processes: wall seconds and the report."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["quantize", "--model", str(src), "--out", str(out), "--scale", "search", "--json",
            *extra]
    env = dict(env)
    if gpus is None:  # CPU logic check: torchrun on gloo, which runs each rank on one thread
        args += ["--device", "cpu"]
        env["OMP_NUM_THREADS"] = "1"  # CPU matmuls' bytes depend on the thread count
        cmd = ([sys.executable, "-m", "mxptq", *args] if n == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={n}", "-m", "mxptq", *args])
    elif n == 1:
        env["CUDA_VISIBLE_DEVICES"] = str(gpus[0])
        cmd = [sys.executable, "-m", "mxptq", *args]
    else:
        cmd = [sys.executable, "-m", "mxptq", *args, "--gpus", ",".join(map(str, gpus[:n]))]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return secs, json.loads((out / "mxptq_report.json").read_text())


def floor_one(src: Path, out: Path, shards: list[str], sizes: dict[str, int]) -> None:
    """Read these input shards whole and write their output's bytes, safetensors alone."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name in shards:
        with safe_open(str(src / name), "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                f.get_tensor(k)
        save_file({"blob": torch.empty(sizes[name], dtype=torch.uint8)}, str(out / name),
                  metadata={"format": "pt"})


def io_floor(src: Path, out: Path, n: int, sizes: dict[str, int]) -> float:
    """N processes at once, each on the shards its rank would write; their wall time."""
    names = sorted(p.name for p in src.glob("*.safetensors"))
    parts = assign([(src / s).stat().st_size for s in names], n)
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "mxptq.bench.distributed", "--floor-only",
                               str(src), str(out), json.dumps([names[i] for i in part]),
                               json.dumps(sizes)]) for part in parts]
    if any(p.wait() for p in procs):
        sys.exit("the I/O floor process failed")
    secs = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="llama-8b")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mxptq-dist"))
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: llama-8b 32, llama-32b 32 of 64)")
    ap.add_argument("--shard-gib", type=float, default=2.0,
                    help="input shard size: the unit the ranks split (default 2)")
    ap.add_argument("--gpus", default="0", help="GPU indices to use, e.g. 0,1,2,3 (default 0)")
    ap.add_argument("--counts", default="",
                    help="process counts besides 1, each the first N of --gpus (default: all "
                    "of --gpus when it names more than one)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-batch", type=int, default=4,
                    help="windows per batch, the unit the ranks split (default 4)")
    ap.add_argument("--importance", default="hessian", choices=("diag", "hessian"))
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--no-calib", action="store_true", help="weight-only runs alone")
    ap.add_argument("--tiny", action="store_true", help="CPU-test sizes (logic check, gloo)")
    ap.add_argument("--keep-data", action="store_true",
                    help="keep the generated checkpoint for a later run (default: removed)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--floor-only", nargs=4, help=argparse.SUPPRESS)  # one floor process
    a = ap.parse_args()
    if a.floor_only:
        src_f, out_f, shards, sizes = a.floor_only
        floor_one(Path(src_f), Path(out_f), json.loads(shards), json.loads(sizes))
        return
    cuda = torch.cuda.is_available() and not a.tiny
    gpus = [int(g) for g in a.gpus.split(",")] if cuda else None
    counts = ([int(n) for n in a.counts.split(",") if n] if a.counts else
              [len(gpus)] if gpus and len(gpus) > 1 else [])
    if gpus is not None and any(not 1 < n <= len(gpus) for n in counts):
        sys.exit(f"--counts {a.counts}: each must be between 2 and the {len(gpus)} of --gpus")
    if a.tiny:
        c = dict(TINY["llama-8b"], layers=a.layers or 2)
        shard_gib, samples, seqlen, batch = 0.0004, 8, 64, 2
    else:
        c = dict(MODELS[a.model], layers=a.layers or 32)
        shard_gib, samples, seqlen = a.shard_gib, a.calib_samples, a.calib_seqlen
        batch = a.calib_batch
    words = min(WORDS, c["vocab"] - 3)
    a.dir.mkdir(parents=True, exist_ok=True)
    src, out, floor_dir = a.dir / f"{a.model}-src", a.dir / "out", a.dir / "floor"
    t = time.perf_counter()
    if not (src / "config.json").is_file():
        generate(src, "llama-8b", c, None, shard_gib)
        write_tokenizer(src, words)
    gen_s = time.perf_counter() - t
    text = a.dir / "calib.txt"
    write_text(text, samples * seqlen * 2, words)
    in_sizes = {p.name: p.stat().st_size for p in sorted(src.glob("*.safetensors"))}
    cache = a.dir / "skeleton-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, MXPTQ_CACHE_DIR=str(cache))
    calib = ["--calib", str(text), "--calib-samples", str(samples), "--calib-seqlen",
             str(seqlen), "--calib-batch", str(batch), "--algo", "gptq", "--importance",
             a.importance]
    subprocess.run([sys.executable, "-m", "mxptq", "quantize", "--model", str(src), "--out",
                    str(out), "--dry-run"], check=True, env=env, capture_output=True)

    rows = []
    ref: dict[str, dict] = {}
    out_sizes: dict[str, int] = {}
    for n in [1, *counts]:
        row = {"processes": n}
        wall, rep = quantize(src, out, gpus, n, [], env)
        dig = digest(out)
        if n == 1:
            outs = sorted(p for p in out.glob("*.safetensors"))
            out_sizes = {s: o.stat().st_size for s, o in zip(in_sizes, outs, strict=True)}
            ref["weight"] = dig
        row.update(weight_wall_s=wall, weight_total_s=rep["timings"]["total_s"],
                   weight_identical=dig == ref["weight"])
        shutil.rmtree(out, ignore_errors=True)
        row["io_floor_s"] = io_floor(src, floor_dir, n, out_sizes)
        if not a.no_calib:
            wall, rep = quantize(src, out, gpus, n, calib, env)
            dig = digest(out)
            ref.setdefault("calib", dig)
            row.update(calib_wall_s=wall, calib_total_s=rep["timings"]["total_s"],
                       calibration_s=rep["calibration"]["seconds"],
                       calib_identical=dig == ref["calib"])
            shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        row["weight_speedup"] = rows[0]["weight_wall_s"] / row["weight_wall_s"]
        row["weight_ratio_to_floor"] = row["weight_wall_s"] / row["io_floor_s"]
        if "calib_wall_s" in row:
            row["calib_speedup"] = rows[0]["calib_wall_s"] / row["calib_wall_s"]
    if not a.keep_data:
        shutil.rmtree(src, ignore_errors=True)
    res = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "gpus": a.gpus if cuda else None, "model": a.model, "tiny": a.tiny,
        "layers": c["layers"], "shards": len(in_sizes),
        "largest_shard_gib": max(in_sizes.values()) / GIB,
        "input_gib": sum(in_sizes.values()) / GIB, "output_gib": sum(out_sizes.values()) / GIB,
        "calibration": None if a.no_calib else {"samples": samples, "seqlen": seqlen,
                                                "batch": batch, "importance": a.importance},
        "generate_s": gen_s, "runs": rows, "versions": rep["versions"],
    }
    print(json.dumps(res, indent=2))
    for row in rows:
        line = (f"{row['processes']} process(es): weight-only {row['weight_wall_s']:.1f} s "
                f"(x{row['weight_speedup']:.2f}, floor {row['io_floor_s']:.1f} s)")
        if "calib_wall_s" in row:
            line += (f"; calibration + GPTQ {row['calib_wall_s']:.1f} s "
                     f"(x{row['calib_speedup']:.2f})")
        same = row["weight_identical"] and row.get("calib_identical", True)
        print(line + ("" if same else "; BYTES DIFFER FROM ONE PROCESS"))
    if a.json_out:
        a.json_out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
