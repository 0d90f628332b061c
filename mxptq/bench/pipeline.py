"""End-to-end speed and memory of `mxptq quantize` on a synthetic Llama-3.1-8B checkpoint.

Generates bf16 tensors with Llama-3.1-8B's names and shapes (heavy-tailed random values, made on
the GPU when there is one) in four shards on local disk, then in the same run times
  1. `mxptq quantize --scale search` as a subprocess, end to end: a first run with an empty
     skeleton cache (cold), a dry run (start-up alone), then --repeat runs (median reported);
  2. the I/O floor: read every input tensor and write the output bytes with safetensors alone,
     in this process and as a fresh process;
and prints wall times, their ratio, peak host RSS and peak GPU memory.

    python -m mxptq.bench.pipeline --dir /tmp/mxptq-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LLAMA_8B = dict(vocab=128256, hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8)


def llama_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv = c["hidden"], c["inter"], c["hidden"] // c["heads"] * c["kv_heads"]
    out = [("model.embed_tokens.weight", (c["vocab"], h))]
    for n in range(c["layers"]):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab"], h))]


def llama_config(c: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c["hidden"], "intermediate_size": c["inter"],
        "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"],
        "num_key_value_heads": c["kv_heads"], "vocab_size": c["vocab"],
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
        "eos_token_id": 128001, "hidden_act": "silu",
    }


def heavy_tailed(shape, device, gen) -> torch.Tensor:
    """Normal values scaled by a log-normal factor per element: heavy tails like trained weights."""
    x = torch.randn(shape, device=device, generator=gen)
    s = torch.randn(shape, device=device, generator=gen).mul_(0.6).exp_()
    return x.mul_(s).mul_(0.02).to(torch.bfloat16)


def generate(folder: Path, c: dict, shards: int, seed: int = 0) -> None:
    """Write the checkpoint in `shards` files of about equal size, plus config and index."""
    folder.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    shapes = llama_shapes(c)
    total = sum(2 * torch.Size(s).numel() for _, s in shapes)
    target = total / shards
    weight_map, cur, cur_bytes, k = {}, {}, 0, 1
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    for j, (name, shape) in enumerate(shapes):
        cur[name] = (torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1
                     else heavy_tailed(shape, dev, gen).cpu())
        cur_bytes += cur[name].numel() * 2
        weight_map[name] = names[k - 1]
        if (cur_bytes >= target and k < shards) or j == len(shapes) - 1:
            save_file(cur, str(folder / names[k - 1]), metadata={"format": "pt"})
            cur, cur_bytes, k = {}, 0, k + 1
    (folder / "config.json").write_text(json.dumps(llama_config(c), indent=2))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def io_floor(src: Path, out: Path, out_bytes: dict[str, int]) -> float:
    """Read every input tensor and write shards of the output's sizes, safetensors only."""
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                f.get_tensor(k)
        n = out_bytes.get(shard.name, 0)
        save_file({"blob": torch.empty(n, dtype=torch.uint8)}, str(out / shard.name),
                  metadata={"format": "pt"})
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mxptq-bench"))
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--scale", default="search")
    ap.add_argument("--layers", type=int, default=LLAMA_8B["layers"], help="fewer for a smoke run")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs; the median is reported")
    ap.add_argument("--floor-only", nargs=3, metavar=("SRC", "OUT", "SIZES_JSON"),
                    help=argparse.SUPPRESS)  # the floor in a fresh process (used by main)
    a = ap.parse_args()
    if a.floor_only:
        src_f, out_f, sizes = a.floor_only
        io_floor(Path(src_f), Path(out_f), json.loads(sizes))
        return
    c = dict(LLAMA_8B, layers=a.layers)
    src, out, floor_out = a.dir / "llama8b-bf16", a.dir / "out", a.dir / "floor"
    t = time.perf_counter()
    if not (src / "config.json").is_file():
        generate(src, c, a.shards)
    gen_s = time.perf_counter() - t
    in_sizes = {p.name: p.stat().st_size for p in src.glob("*.safetensors")}

    cmd = [sys.executable, "-m", "mxptq.cli", "quantize", "--model", str(src), "--out", str(out),
           "--scale", a.scale, "--json"]
    # A skeleton cache of this run only: the first run starts cold (builds the meta skeleton,
    # importing transformers' modeling code), later runs read it as any repeat run would.
    cache = a.dir / "skeleton-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, MXPTQ_CACHE_DIR=str(cache))

    def quantize(*extra: str) -> float:
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        r = subprocess.run([*cmd, *extra], capture_output=True, text=True, env=env)
        secs = time.perf_counter() - t
        if r.returncode:
            sys.exit(f"mxptq quantize failed:\n{r.stderr[-3000:]}")
        return secs

    cold = quantize()
    dry = quantize("--dry-run")  # start-up alone: imports, config, cached skeleton, plan
    walls, internals = [], []
    for _ in range(a.repeat):
        walls.append(quantize())
        report = json.loads((out / "mxptq_report.json").read_text())
        internals.append(report["timings"]["total_s"])
    wall = sorted(walls)[len(walls) // 2]  # the median run
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    names = sorted(in_sizes)
    outs = sorted(p for p in out.glob("*.safetensors"))
    out_bytes = {n: o.stat().st_size for n, o in zip(names, outs, strict=True)}

    shutil.rmtree(floor_out, ignore_errors=True)
    floor = io_floor(src, floor_out, out_bytes)
    shutil.rmtree(floor_out, ignore_errors=True)
    # The same floor as a fresh process (interpreter and torch start-up included), which is
    # what a separate safetensors-only tool would take end to end.
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mxptq.bench.pipeline", "--floor-only", str(src),
                    str(floor_out), json.dumps(out_bytes)], check=True, env=env)
    floor_proc = time.perf_counter() - t
    shutil.rmtree(floor_out, ignore_errors=True)

    gib = 2**30
    res = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "input_gib": sum(in_sizes.values()) / gib,
        "largest_shard_gib": max(in_sizes.values()) / gib,
        "output_gib": sum(out_bytes.values()) / gib,
        "generate_s": gen_s,
        "io_floor_s": floor,
        "io_floor_process_s": floor_proc,
        "quantize_wall_s": wall,
        "quantize_cold_wall_s": cold,
        "cold_ratio_to_floor": cold / floor,
        "quantize_wall_runs_s": walls,
        "quantize_internal_runs_s": internals,
        "dry_run_wall_s": dry,
        "ratio_to_floor": wall / floor,
        "peak_rss_gib": child_rss / gib,
        "rss_budget_gib": max(in_sizes.values()) / gib + 2,
        "peak_gpu_gib": report["memory"].get("peak_gpu_allocated_bytes", 0) / gib,
        "rel_mse_mean": report["quantization_error"]["rel_mse_mean"],
        "versions": report["versions"],
    }
    print(json.dumps(res, indent=2))
    print(f"\nwall {wall:.1f} s vs I/O floor {floor:.1f} s: {wall / floor:.2f}x (target <= 1.5x); "
          f"first run (skeleton not cached) {cold:.1f} s = {cold / floor:.2f}x; "
          f"floor as its own process {floor_proc:.1f} s; "
          f"peak RSS {res['peak_rss_gib']:.2f} GiB (budget {res['rss_budget_gib']:.2f} GiB); "
          f"peak GPU {res['peak_gpu_gib']:.2f} GiB")
    if a.json_out:
        a.json_out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
