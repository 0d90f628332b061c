"""End-to-end speed and memory of `mxptq quantize` on synthetic checkpoints of real shapes.

Models (`--model`), each written with the real tensor names and shapes (heavy-tailed random
values, generated on the GPU when there is one, written once through the streaming shard
writer):
  llama-8b     Llama-3.1-8B, bf16, all 32 layers, 4 shards;
  deepseek-v3  a slice of DeepSeek-V3 (671B) as published: FP8 E4M3 weights with 128x128
               `weight_scale_inv` block scales, MLA attention, `--dense-layers` dense-MLP
               layers then MoE layers of 1 shared + 256 routed experts (7168x2048), bf16
               router/norms, shards of about 4.3 GiB like the release's;
  qwen3-235b   a slice of Qwen3-235B-A22B: bf16, 128 experts (4096x1536) per layer, GQA
               attention, shards of about 4 GiB.
Slices keep every per-layer shape and count; they differ from the full model in the number of
layers and in the vocabulary (embeddings and head, kept dense, are scaled to 8192 rows: a
plain copy whose full size the extrapolation adds back).

In one run it times
  1. `mxptq quantize --scale search` as a subprocess: a first run with an empty skeleton cache
     (cold), a dry run (start-up alone), then --repeat runs (median reported);
  2. the I/O floor: read every input tensor and write the output's bytes with safetensors
     alone, in this process and as a fresh process;
and reports wall times, their ratio, peak host RSS, peak GPU memory, and the figures
extrapolated to the full model by bytes. With a GPU it also checks on a small checkpoint of the
same kind that `--device cuda` and `--device cpu` write the same bytes (decoding included).

    python -m mxptq.bench.pipeline --model deepseek-v3 --dir /tmp/mxptq-bench --json-out ds.json
    python -m mxptq.bench.pipeline --model deepseek-v3 --tiny --repeat 1   # logic check on CPU
"""

from __future__ import annotations

import argparse
import json
import math
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

from ..checkpoint.safetensors_io import ShardWriter

GIB = 2**30
LLAMA_8B = dict(vocab=128256, hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8)
# config.json of deepseek-ai/DeepSeek-V3 and Qwen/Qwen3-235B-A22B (the fields the shapes use)
DEEPSEEK_V3 = dict(vocab=129280, hidden=7168, inter=18432, moe_inter=2048, experts=256,
                   shared=1, heads=128, q_lora=1536, kv_lora=512, nope=128, rope=64, v_head=128,
                   layers=61, dense_layers=3, block=128)
QWEN3_235B = dict(vocab=151936, hidden=4096, moe_inter=1536, experts=128, heads=64,
                  kv_heads=4, head_dim=128, layers=94)
TINY = {  # the same structure at CPU-test sizes (block 128 makes the edges partial)
    "llama-8b": dict(LLAMA_8B, vocab=512, hidden=256, inter=512, layers=2, heads=4, kv_heads=2),
    "deepseek-v3": dict(DEEPSEEK_V3, vocab=512, hidden=256, inter=512, moe_inter=64, experts=8,
                        heads=4, q_lora=96, kv_lora=64, nope=32, rope=16, v_head=32),
    "qwen3-235b": dict(QWEN3_235B, vocab=512, hidden=256, moe_inter=64, experts=8, heads=4,
                       kv_heads=2, head_dim=64),
}
SLICE_VOCAB = 8192
SHARD_GIB = {"llama-8b": None, "deepseek-v3": 4.3, "qwen3-235b": 4.0}

Spec = tuple[str, tuple[int, ...], str]  # name, shape, kind: "linear" (a projection) or "dense"


def llama_shapes(c: dict) -> list[Spec]:
    h, i, kv = c["hidden"], c["inter"], c["hidden"] // c["heads"] * c["kv_heads"]
    out: list[Spec] = [("model.embed_tokens.weight", (c["vocab"], h), "dense")]
    for n in range(c["layers"]):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.input_layernorm.weight", (h,), "dense"),
            (f"{p}.self_attn.q_proj.weight", (h, h), "linear"),
            (f"{p}.self_attn.k_proj.weight", (kv, h), "linear"),
            (f"{p}.self_attn.v_proj.weight", (kv, h), "linear"),
            (f"{p}.self_attn.o_proj.weight", (h, h), "linear"),
            (f"{p}.post_attention_layernorm.weight", (h,), "dense"),
            (f"{p}.mlp.gate_proj.weight", (i, h), "linear"),
            (f"{p}.mlp.up_proj.weight", (i, h), "linear"),
            (f"{p}.mlp.down_proj.weight", (h, i), "linear"),
        ]
    return out + _final(c["vocab"], h)


def _final(vocab: int, h: int) -> list[Spec]:
    return [("model.norm.weight", (h,), "dense"), ("lm_head.weight", (vocab, h), "dense")]


def _mlp(p: str, inter: int, h: int) -> list[Spec]:
    return [(f"{p}.gate_proj.weight", (inter, h), "linear"),
            (f"{p}.up_proj.weight", (inter, h), "linear"),
            (f"{p}.down_proj.weight", (h, inter), "linear")]


def deepseek_shapes(c: dict) -> list[Spec]:
    """DeepSeek-V3's checkpoint names: MLA attention, dense MLP in the first layers, then
    routed + shared experts with a sigmoid router and its correction bias."""
    h, nh = c["hidden"], c["heads"]
    out: list[Spec] = [("model.embed_tokens.weight", (c["vocab"], h), "dense")]
    for n in range(c["layers"]):
        p = f"model.layers.{n}"
        a = f"{p}.self_attn"
        out += [
            (f"{p}.input_layernorm.weight", (h,), "dense"),
            (f"{a}.q_a_proj.weight", (c["q_lora"], h), "linear"),
            (f"{a}.q_a_layernorm.weight", (c["q_lora"],), "dense"),
            (f"{a}.q_b_proj.weight", (nh * (c["nope"] + c["rope"]), c["q_lora"]), "linear"),
            (f"{a}.kv_a_proj_with_mqa.weight", (c["kv_lora"] + c["rope"], h), "linear"),
            (f"{a}.kv_a_layernorm.weight", (c["kv_lora"],), "dense"),
            (f"{a}.kv_b_proj.weight", (nh * (c["nope"] + c["v_head"]), c["kv_lora"]), "linear"),
            (f"{a}.o_proj.weight", (h, nh * c["v_head"]), "linear"),
            (f"{p}.post_attention_layernorm.weight", (h,), "dense"),
        ]
        if n < c["dense_layers"]:
            out += _mlp(f"{p}.mlp", c["inter"], h)
            continue
        out += [(f"{p}.mlp.gate.weight", (c["experts"], h), "dense"),
                (f"{p}.mlp.gate.e_score_correction_bias", (c["experts"],), "dense")]
        out += _mlp(f"{p}.mlp.shared_experts", c["moe_inter"] * c["shared"], h)
        for e in range(c["experts"]):
            out += _mlp(f"{p}.mlp.experts.{e}", c["moe_inter"], h)
    return out + _final(c["vocab"], h)


def qwen3_moe_shapes(c: dict) -> list[Spec]:
    h, d = c["hidden"], c["head_dim"]
    out: list[Spec] = [("model.embed_tokens.weight", (c["vocab"], h), "dense")]
    for n in range(c["layers"]):
        p = f"model.layers.{n}"
        a = f"{p}.self_attn"
        out += [
            (f"{p}.input_layernorm.weight", (h,), "dense"),
            (f"{a}.q_proj.weight", (c["heads"] * d, h), "linear"),
            (f"{a}.k_proj.weight", (c["kv_heads"] * d, h), "linear"),
            (f"{a}.v_proj.weight", (c["kv_heads"] * d, h), "linear"),
            (f"{a}.o_proj.weight", (h, c["heads"] * d), "linear"),
            (f"{a}.q_norm.weight", (d,), "dense"),
            (f"{a}.k_norm.weight", (d,), "dense"),
            (f"{p}.post_attention_layernorm.weight", (h,), "dense"),
            (f"{p}.mlp.gate.weight", (c["experts"], h), "dense"),
        ]
        for e in range(c["experts"]):
            out += _mlp(f"{p}.mlp.experts.{e}", c["moe_inter"], h)
    return out + _final(c["vocab"], h)


def model_config(model: str, c: dict) -> dict:
    """config.json of the slice (the release's fields, with the slice's layer count)."""
    common = {"vocab_size": c["vocab"], "hidden_size": c["hidden"], "torch_dtype": "bfloat16",
              "num_hidden_layers": c["layers"], "tie_word_embeddings": False,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "bos_token_id": 0,
              "eos_token_id": 1}
    if model == "llama-8b":
        return dict(common, architectures=["LlamaForCausalLM"], model_type="llama",
                    intermediate_size=c["inter"], num_attention_heads=c["heads"],
                    num_key_value_heads=c["kv_heads"], rope_theta=500000.0, hidden_act="silu")
    if model == "deepseek-v3":
        return dict(common, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                    intermediate_size=c["inter"], moe_intermediate_size=c["moe_inter"],
                    n_routed_experts=c["experts"], n_shared_experts=c["shared"],
                    num_experts_per_tok=8, num_attention_heads=c["heads"],
                    num_key_value_heads=c["heads"], q_lora_rank=c["q_lora"],
                    kv_lora_rank=c["kv_lora"], qk_nope_head_dim=c["nope"],
                    qk_rope_head_dim=c["rope"], v_head_dim=c["v_head"],
                    first_k_dense_replace=c["dense_layers"], n_group=8, topk_group=4,
                    routed_scaling_factor=2.5, norm_topk_prob=True, hidden_act="silu",
                    quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                                         "quant_method": "fp8",
                                         "weight_block_size": [c["block"], c["block"]]})
    return dict(common, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                intermediate_size=4 * c["hidden"], moe_intermediate_size=c["moe_inter"],
                num_experts=c["experts"], num_experts_per_tok=8, decoder_sparse_step=1,
                mlp_only_layers=[], num_attention_heads=c["heads"],
                num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"], norm_topk_prob=True,
                rope_theta=1000000.0, hidden_act="silu")


SHAPES = {"llama-8b": llama_shapes, "deepseek-v3": deepseek_shapes, "qwen3-235b": qwen3_moe_shapes}


def stored(model: str, c: dict, specs: list[Spec]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every stored tensor: FP8 projections with their
    fp32 `weight_scale_inv` for DeepSeek-V3, bf16 otherwise (the router bias in fp32)."""
    out = []
    for name, shape, kind in specs:
        if model == "deepseek-v3" and kind == "linear":
            b = c["block"]
            out.append((name, "F8_E4M3", shape))
            out.append((f"{name}_scale_inv", "F32", (-(-shape[0] // b), -(-shape[1] // b))))
        else:
            out.append((name, "F32" if name.endswith("_bias") else "BF16", shape))
    return out


def nbytes(dtype: str, shape) -> int:
    return math.prod(shape) * {"F8_E4M3": 1, "BF16": 2, "F32": 4}[dtype]


def output_bytes(specs: list[Spec]) -> int:
    """What `mxptq quantize` (nvfp4, compressed-tensors) writes: projections as E2M1 + E4M3
    block scales + an fp32 global, everything else (head, embeddings, router) in bf16/fp32."""
    total = 0
    for name, shape, kind in specs:
        if kind == "linear" and shape[1] % 16 == 0:
            total += shape[0] * shape[1] // 2 + shape[0] * shape[1] // 16 + 4
        else:
            total += nbytes("F32" if name.endswith("_bias") else "BF16", shape)
    return total


def heavy_tailed(shape, device, gen) -> torch.Tensor:
    """Normal values scaled by a log-normal factor per element: heavy tails like trained weights."""
    x = torch.randn(shape, device=device, generator=gen)
    s = torch.randn(shape, device=device, generator=gen).mul_(0.6).exp_()
    return x.mul_(s).mul_(0.02).to(torch.bfloat16)


def fp8_blocks(w: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's FP8 layout: one fp32 scale (amax/448) per b x b block, edges zero-padded."""
    n, k = w.shape
    pad = torch.zeros(-(-n // b) * b, -(-k // b) * b, device=w.device)
    pad[:n, :k] = w
    blocks = pad.view(pad.shape[0] // b, b, pad.shape[1] // b, b)
    s = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448
    q = (blocks / s[:, None, :, None]).view(pad.shape)[:n, :k].to(torch.float8_e4m3fn)
    return q, s


def shard_groups(tensors: list, target: float) -> list[list]:
    """Consecutive tensors in shards of about `target` bytes; a weight and its scale stay
    together."""
    groups, cur, size = [], [], 0
    for t in tensors:
        if cur and size + nbytes(t[1], t[2]) > target and not t[0].endswith("_scale_inv"):
            groups.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += nbytes(t[1], t[2])
    return [*groups, cur]


def generate(folder: Path, model: str, c: dict, shards: int | None, shard_gib: float | None,
             seed: int = 0) -> None:
    """Write the checkpoint (shards of about `shard_gib`, or `shards` equal ones), config and
    index, one tensor at a time through the streaming shard writer."""
    folder.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    specs = SHAPES[model](c)
    tensors = stored(model, c, specs)
    total = sum(nbytes(d, s) for _, d, s in tensors)
    groups = shard_groups(tensors, shard_gib * GIB if shard_gib else total / (shards or 1))
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    scales = {}
    for fname, group in zip(names, groups, strict=True):
        w = ShardWriter(folder / fname, {n: (d, s) for n, d, s in group})
        for name, dtype, shape in group:
            weight_map[name] = fname
            if name in scales:
                w.put(name, scales.pop(name))
            elif len(shape) == 1:
                t = torch.ones(shape, dtype=torch.float32 if dtype == "F32" else torch.bfloat16)
                w.put(name, t)
            elif dtype == "F8_E4M3":
                q, s = fp8_blocks(heavy_tailed(shape, dev, gen).float(), c["block"])
                w.put(name, q.cpu())
                scales[f"{name}_scale_inv"] = s.cpu()
            else:
                w.put(name, heavy_tailed(shape, dev, gen).cpu())
        w.close()
    (folder / "config.json").write_text(json.dumps(model_config(model, c), indent=2))
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


def exact_check(folder: Path, model: str, env: dict) -> bool | None:
    """On a GPU: a small checkpoint of the same kind quantized with --device cuda and --device
    cpu gives the same bytes (FP8 decoding on the GPU included). None without a GPU."""
    if not torch.cuda.is_available():
        return None
    src = folder / "exact-src"
    shutil.rmtree(src, ignore_errors=True)
    generate(src, model, dict(TINY[model], layers=2, dense_layers=1), 3, None, seed=1)
    outs = []
    for dev in ("cuda", "cpu"):
        out = folder / f"exact-{dev}"
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "mxptq.cli", "quantize", "--model", str(src),
                        "--out", str(out), "--device", dev, "--json"], check=True, env=env,
                       capture_output=True)
        outs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))})
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    return outs[0] == outs[1]


RELEASES = {"llama-8b": LLAMA_8B, "deepseek-v3": DEEPSEEK_V3, "qwen3-235b": QWEN3_235B}


def full_model(model: str) -> dict:
    """Parameters and bytes in and out of the whole released model (every layer, the real
    vocabulary; DeepSeek-V3 without its multi-token-prediction layer)."""
    c = RELEASES[model]
    specs = SHAPES[model](c)
    return {"layers": c["layers"],
            "params": sum(math.prod(s) for _, s, _ in specs),
            "bytes_in": sum(nbytes(d, s) for _, d, s in stored(model, c, specs)),
            "bytes_out": output_bytes(specs)}


def stage(msg: str) -> None:
    """One line per finished stage on stderr, so a run cut short still shows how far it got."""
    print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama-8b")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mxptq-bench"))
    ap.add_argument("--layers", type=int, default=None,
                    help="layers in the slice (default: llama-8b 32, deepseek-v3 4, qwen3-235b 8)")
    ap.add_argument("--dense-layers", type=int, default=1,
                    help="deepseek-v3: how many of the slice's layers have the dense MLP")
    ap.add_argument("--shards", type=int, default=4, help="llama-8b: number of shards")
    ap.add_argument("--tiny", action="store_true", help="CPU-test sizes (logic check)")
    ap.add_argument("--scale", default="search")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs; the median is reported")
    ap.add_argument("--keep-data", action="store_true",
                    help="keep the generated checkpoint for a later run (default: removed)")
    ap.add_argument("--floor-only", nargs=3, metavar=("SRC", "OUT", "SIZES_JSON"),
                    help=argparse.SUPPRESS)  # the floor in a fresh process (used by main)
    a = ap.parse_args()
    if a.floor_only:
        src_f, out_f, sizes = a.floor_only
        io_floor(Path(src_f), Path(out_f), json.loads(sizes))
        return
    if a.repeat < 1:
        sys.exit("--repeat must be at least 1")
    base = TINY[a.model] if a.tiny else RELEASES[a.model]
    layers = a.layers or (2 if a.tiny else {"llama-8b": 32, "deepseek-v3": 4,
                                            "qwen3-235b": 8}[a.model])
    c = dict(base, layers=layers, dense_layers=min(a.dense_layers, layers))
    if a.model != "llama-8b" and not a.tiny:
        c["vocab"] = SLICE_VOCAB
    specs = SHAPES[a.model](c)
    est_in = sum(nbytes(d, s) for _, d, s in stored(a.model, c, specs))
    est_out = output_bytes(specs)
    a.dir.mkdir(parents=True, exist_ok=True)
    src, out, floor_out = a.dir / f"{a.model}-src", a.dir / "out", a.dir / "floor"
    free = shutil.disk_usage(a.dir).free
    need = est_out + (0 if (src / "config.json").is_file() else est_in) + GIB
    if need > free:
        sys.exit(f"{a.dir}: needs {need / GIB:.1f} GiB free for the input and one output, has "
                 f"{free / GIB:.1f} GiB; pass fewer --layers")
    t = time.perf_counter()
    if not (src / "config.json").is_file():
        generate(src, a.model, c, a.shards, None if a.tiny else SHARD_GIB[a.model])
    gen_s = time.perf_counter() - t
    stage(f"input ready ({est_in / GIB:.1f} GiB, {gen_s:.1f} s)")
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
    stage(f"first quantize (cold) {cold:.1f} s")
    dry = quantize("--dry-run")  # start-up alone: imports, config, cached skeleton, plan
    stage(f"dry run {dry:.1f} s")
    walls, internals = [], []
    for _ in range(a.repeat):
        walls.append(quantize())
        stage(f"quantize {walls[-1]:.1f} s")
        report = json.loads((out / "mxptq_report.json").read_text())
        internals.append(report["timings"]["total_s"])
    wall = sorted(walls)[len(walls) // 2]  # the median run
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    names = sorted(in_sizes)
    outs = sorted(p for p in out.glob("*.safetensors"))
    out_bytes = {n: o.stat().st_size for n, o in zip(names, outs, strict=True)}
    shutil.rmtree(out, ignore_errors=True)  # the floor writes as much again

    shutil.rmtree(floor_out, ignore_errors=True)
    floor = io_floor(src, floor_out, out_bytes)
    stage(f"I/O floor {floor:.1f} s")
    shutil.rmtree(floor_out, ignore_errors=True)
    # The same floor as a fresh process (interpreter and torch start-up included), which is
    # what a separate safetensors-only tool would take end to end.
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mxptq.bench.pipeline", "--floor-only", str(src),
                    str(floor_out), json.dumps(out_bytes)], check=True, env=env)
    floor_proc = time.perf_counter() - t
    shutil.rmtree(floor_out, ignore_errors=True)
    exact = exact_check(a.dir, a.model, env)
    if not a.keep_data:
        shutil.rmtree(src, ignore_errors=True)

    bytes_in, bytes_out = sum(in_sizes.values()), sum(out_bytes.values())
    full = full_model(a.model)
    # Extrapolation by bytes: start-up as measured (the dry run), streaming and the floor
    # scaled by the bytes they move.
    stream = max(wall - dry, 0.0)
    full_wall = dry + stream * full["bytes_in"] / bytes_in
    full_floor = floor * (full["bytes_in"] + full["bytes_out"]) / (bytes_in + bytes_out)
    res = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": a.model,
        "slice": {k: c[k] for k in ("layers", "dense_layers", "vocab") if k in c}
        | {"experts": c.get("experts", 0), "shards": len(in_sizes), "tensors": len(specs)},
        "input_gib": bytes_in / GIB,
        "largest_shard_gib": max(in_sizes.values()) / GIB,
        "output_gib": bytes_out / GIB,
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
        "peak_rss_gib": child_rss / GIB,
        "rss_budget_gib": max(in_sizes.values()) / GIB + 2,
        "peak_gpu_gib": report["memory"].get("peak_gpu_allocated_bytes", 0) / GIB,
        "rel_mse_mean": report["quantization_error"]["rel_mse_mean"],
        "cuda_cpu_identical": exact,
        "full_model": full | {"extrapolated_wall_s": full_wall,
                              "extrapolated_floor_s": full_floor},
        "versions": report["versions"],
    }
    print(json.dumps(res, indent=2))
    print(f"\n{a.model}: wall {wall:.1f} s vs I/O floor {floor:.1f} s: {wall / floor:.2f}x "
          f"(target <= 1.3x); first run (skeleton not cached) {cold:.1f} s = "
          f"{cold / floor:.2f}x (target <= 2x); peak RSS {res['peak_rss_gib']:.2f} GiB "
          f"(budget {res['rss_budget_gib']:.2f} GiB); peak GPU {res['peak_gpu_gib']:.2f} GiB; "
          f"full model ({full['bytes_in'] / GIB:.0f} GiB in): about {full_wall / 60:.1f} min "
          f"vs a floor of {full_floor / 60:.1f} min")
    if a.json_out:
        a.json_out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
