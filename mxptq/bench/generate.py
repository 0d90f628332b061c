"""Decoding with `model.generate()`: a checkpoint written by `mxptq quantize`, loaded packed
by `mxptq.load`, against the bf16 model it was quantized from, in one run.

    python -m mxptq.bench.generate --arch llama-3.1-8b [--layers 32] [--batch 1,16]
        [--new-tokens 64] [--prompt 32] [--modes eager,compiled] --work DIR [--out FILE.md]

The bf16 model is built from the architecture's config with random weights (transformers'
init, seed 0) and saved to DIR/src-<arch>-<layers>; `mxptq quantize --format nvfp4 --scale
absmax` writes DIR/q-<arch>-<layers> (both reused when present). Architectures: llama-3.1-8b
(32 layers), qwen3-30b-a3b (48 layers, 128 experts, top-8; `--layers` fewer to fit a run), and
tiny-llama / tiny-moe for a CPU check of this script.

For each model, batch size and mode, the prompt is `--prompt` random tokens and generation is
greedy with exactly `--new-tokens` tokens:

- eager: `generate(..., disable_compile=True)` with transformers' default dynamic cache (what
  most people run);
- compiled: `generate(..., cache_implementation="static", compile_config=CompileConfig(
  mode="reduce-overhead"))`: transformers compiles the decoding forward with torch.compile and
  CUDA graphs (the prefill stays eager).

decode tok/s = batch · (new_tokens − 1) / (t(new_tokens) − t(1)), t the median wall time of
whole generate() calls (after warm-up, so compilation and graph recording are out): the prefill
and the first token cancel. The compiled static cache keeps its first (largest) length, so the
short call reuses the long one's graphs. "agree" is the share of nvfp4 tokens the compiled
run generates equal to the eager run's (kernels may sum in another order under CUDA graphs).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ARCHS = {
    "llama-3.1-8b": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
        ),
    ),
    "tiny-llama": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=256,
            tie_word_embeddings=False,
        ),
    ),
    "tiny-moe": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=256,
            tie_word_embeddings=False,
        ),
    ),
}


def build_source(arch: str, layers: int | None, work: Path, device: str) -> tuple[Path, object]:
    """The bf16 model (random weights, seed 0) and its saved folder."""
    import transformers

    cfg_name, kw = ARCHS[arch]
    kw = dict(kw, **({"num_hidden_layers": layers} if layers else {}))
    config = getattr(transformers, cfg_name)(**kw)
    src = work / f"src-{arch}-{config.num_hidden_layers}"
    torch.manual_seed(0)
    if (src / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            src, dtype=torch.bfloat16, device_map=device
        )
    else:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.generation_config.pad_token_id = 0
        model.save_pretrained(src, max_shard_size="4GB")
    return src, model.eval()


def quantize(src: Path, work: Path, device: str) -> Path:
    """`mxptq quantize` in a child process, as a user runs it (skipped when done before)."""
    out = work / src.name.replace("src-", "q-", 1)
    if not (out / "config.json").is_file():
        cmd = [
            sys.executable,
            "-m",
            "mxptq.cli",
            "quantize",
            "--model",
            str(src),
            "--out",
            str(out),
            "--format",
            "nvfp4",
            "--scale",
            "absmax",
            "--device",
            device,
        ]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"quantized in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _generate(model, ids, new: int, mode: str):
    from transformers import CompileConfig

    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if mode == "compiled":
        kw.update(
            cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead")
        )
    else:
        kw.update(disable_compile=True)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def decode_rate(
    model, ids, new: int, mode: str, device: str, repeats: int
) -> tuple[float, torch.Tensor]:
    """(decode tokens/s, the generated ids) for one model, batch and mode."""

    def timed(n: int) -> float:
        _sync(device)
        t = time.perf_counter()
        _generate(model, ids, n, mode)
        _sync(device)
        return time.perf_counter() - t

    out = _generate(model, ids, new, mode)  # warm-up: compile, record graphs, autotune
    for _ in range(2):
        _generate(model, ids, new, mode)
        _generate(model, ids, 1, mode)
    long = statistics.median(timed(new) for _ in range(repeats))
    short = statistics.median(timed(1) for _ in range(repeats))
    return ids.shape[0] * (new - 1) / max(long - short, 1e-9), out[:, ids.shape[1] :]


def experts_check(model, device: str) -> list[str]:
    """For an MoE model: the first PackedExperts' decode path (grouped expert GEMV on CUDA)
    against its loop path on the same routing, 16 tokens, relative difference."""
    from mxptq.runtime import PackedExperts

    mod = next((m for m in model.modules() if isinstance(m, PackedExperts)), None)
    if mod is None:
        return []
    gen = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(16, mod.hidden_dim, device=device, generator=gen, dtype=torch.bfloat16)
    k = model.config.num_experts_per_tok
    idx = torch.rand(16, mod.num_experts, device=device, generator=gen).topk(k).indices
    w = torch.rand(16, k, device=device, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        got, ref = mod(x, idx, w).float(), mod._loop(x, idx, w).float()
    rel = float((got - ref).norm() / ref.norm())
    return [f"check: PackedExperts decode path vs its loop, 16 tokens: rel diff {rel:.1e}"]


def run(a) -> list[str]:
    import mxptq
    from mxptq.runtime import linear_weight_bytes

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    src, dense = build_source(a.arch, a.layers, work, a.device)
    qdir = quantize(src, work, a.device)
    packed = mxptq.load(qdir, device=a.device, dtype=torch.bfloat16).eval()
    mem_d, mem_p = linear_weight_bytes(dense), linear_weight_bytes(packed)
    name = ("cuda:" + torch.cuda.get_device_name()) if a.device.startswith("cuda") else a.device
    modes = a.modes.split(",")
    lines = [
        f"device: {name}, torch {torch.__version__}; {a.arch}, "
        f"{dense.config.num_hidden_layers} layers; linear and expert weights "
        f"{mem_p.bytes / 2**30:.2f} GiB packed vs {mem_d.bytes / 2**30:.2f} GiB bf16 "
        f"({mem_p.bytes / mem_d.bytes:.3f}x); prompt {a.prompt}, {a.new_tokens} new tokens",
        "",
        "| batch | mode | bf16 tok/s | nvfp4 tok/s | nvfp4 / bf16 | agree |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines[1:1] = experts_check(packed, a.device)
    gen = torch.Generator().manual_seed(1)
    for b in [int(v) for v in a.batch.split(",")]:
        ids = torch.randint(1, dense.config.vocab_size, (b, a.prompt), generator=gen)
        ids = ids.to(a.device)
        toks = {}
        for mode in modes:
            r_d, _ = decode_rate(dense, ids, a.new_tokens, mode, a.device, a.repeats)
            r_p, toks[mode] = decode_rate(packed, ids, a.new_tokens, mode, a.device, a.repeats)
            agree = "-"
            if mode != modes[0]:
                agree = f"{float((toks[mode] == toks[modes[0]]).float().mean()):.2f}"
            row = f"| {b} | {mode} | {r_d:.1f} | {r_p:.1f} | {r_p / r_d:.2f}x | {agree} |"
            print(row, file=sys.stderr, flush=True)
            lines.append(row)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=None, help="default: the architecture's")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", required=True, help="folder for the bf16 and quantized models")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU", file=sys.stderr)
        return 1
    text = "\n".join(run(a))
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
