"""What the durability guarantees cost: SHA-256 of every output tensor and fsync of every file.

On a synthetic Llama checkpoint (mxptq.bench.pipeline's generator), in one process and in the
same run, times the streaming pipeline (`mxptq.pipeline.run`, plan built once) four ways,
interleaved --repeat times (medians reported): as shipped; without the per-tensor SHA-256;
without fsync; without either. Also times the safetensors-only I/O floor, the re-check a
`--resume` does of finished shards (re-read + SHA-256 of all output, warm page cache), and this
host's single-thread SHA-256 throughput. Writes results.json and results.md to --out.

    python -m mxptq.bench.reliability --out $OUT            # Llama-3.1-8B shapes, GPU if any
    python -m mxptq.bench.reliability --out /tmp/r --small  # a CPU smoke run of the logic
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from ..checkpoint import safetensors_io
from ..checkpoint.dialects import get_dialect
from ..checkpoint.manifest import read_manifest, verify_shard
from ..formats import get_format
from ..pipeline import RunOptions, run
from ..plan import build_plan
from .pipeline import LLAMA_8B, generate, io_floor

SMALL = dict(vocab=1024, hidden=256, inter=512, layers=2, heads=4, kv_heads=2)


class _NoHash:
    """Stands in for hashlib in the shard writer: the same calls, no hashing."""

    class _H:
        def update(self, data) -> None:
            pass

        def hexdigest(self) -> str:
            return ""

    def sha256(self, data=b""):
        return self._H()


@contextlib.contextmanager
def _variant(hash_on: bool, fsync_on: bool):
    real_fsync, real_hashlib = os.fsync, safetensors_io.hashlib
    if not fsync_on:
        os.fsync = lambda fd: None
    if not hash_on:
        safetensors_io.hashlib = _NoHash()
    try:
        yield
    finally:
        os.fsync, safetensors_io.hashlib = real_fsync, real_hashlib


def sha256_gbps(n: int = 1 << 28) -> float:
    buf = os.urandom(n)
    t = time.perf_counter()
    hashlib.sha256(buf).digest()
    return n / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="results folder")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mxptq-bench-reliability"),
                    help="where the synthetic checkpoint and outputs go (local disk)")
    ap.add_argument("--layers", type=int, default=LLAMA_8B["layers"])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--scale", default="search")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="tiny shapes: a CPU smoke run")
    a = ap.parse_args()
    c = dict(SMALL) if a.small else dict(LLAMA_8B, layers=a.layers)
    src, dst = a.dir / ("small" if a.small else "llama8b-bf16"), a.dir / "out"
    if not (src / "config.json").is_file():
        generate(src, c, a.shards)
    fmt = get_format("nvfp4")
    plan = build_plan(src, fmt, a.scale, get_dialect("compressed-tensors"))
    variants = {"shipped": (True, True), "no_sha256": (False, True),
                "no_fsync": (True, False), "neither": (False, False)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.repeat):
        for name, (h, f) in variants.items():
            shutil.rmtree(dst, ignore_errors=True)
            with _variant(h, f):
                t = time.perf_counter()
                run(plan, RunOptions(dst, overwrite=True, flags={"bench": name}))
                times[name].append(time.perf_counter() - t)
    # the shipped variant's output, for the resume check and the floor's sizes
    shutil.rmtree(dst, ignore_errors=True)
    run(plan, RunOptions(dst, overwrite=True, flags={"bench": "shipped"}))
    manifest = read_manifest(dst)
    t = time.perf_counter()
    bad = [f for f, rec in manifest["shards"].items() if verify_shard(dst / f, rec)]
    verify_s = time.perf_counter() - t
    assert not bad, bad
    outs = sorted(dst.glob("*.safetensors"))
    names = sorted(p.name for p in src.glob("*.safetensors"))
    floor_dir = a.dir / "floor"
    shutil.rmtree(floor_dir, ignore_errors=True)
    floor = io_floor(src, floor_dir, {n: o.stat().st_size for n, o in zip(names, outs,
                                                                         strict=True)})
    shutil.rmtree(floor_dir, ignore_errors=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    gib = 2**30
    res = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "shapes": c, "scale": a.scale, "repeat": a.repeat,
        "input_gib": sum(p.stat().st_size for p in src.glob("*.safetensors")) / gib,
        "output_gib": sum(o.stat().st_size for o in outs) / gib,
        "output_tensors": sum(len(r["tensors"]) for r in manifest["shards"].values()),
        "runs_s": times, "median_s": med, "io_floor_s": floor,
        "ratio_shipped_to_neither": med["shipped"] / med["neither"],
        "ratio_sha256_cost": med["shipped"] / med["no_sha256"],
        "ratio_fsync_cost": med["shipped"] / med["no_fsync"],
        "ratio_shipped_to_floor": med["shipped"] / floor,
        "ratio_neither_to_floor": med["neither"] / floor,
        "resume_verify_s": verify_s,
        "resume_verify_ratio_to_shipped": verify_s / med["shipped"],
        "sha256_gbps_one_thread": sha256_gbps(),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    rows = [f"| {k} | {med[k]:.2f} | {med[k] / floor:.2f}x |" for k in variants]
    md = "\n".join([
        f"device {res['device']}, {res['input_gib']:.2f} GiB in, {res['output_gib']:.2f} GiB "
        f"out, --scale {a.scale}, median of {a.repeat}",
        "", "| pipeline | seconds | / I/O floor |", "|---|---|---|", *rows,
        f"| I/O floor (safetensors only) | {floor:.2f} | 1.00x |", "",
        f"SHA-256 costs {res['ratio_sha256_cost']:.3f}x, fsync {res['ratio_fsync_cost']:.3f}x, "
        f"both {res['ratio_shipped_to_neither']:.3f}x; the --resume re-check of all finished "
        f"shards takes {verify_s:.2f} s ({res['resume_verify_ratio_to_shipped']:.2f}x a run); "
        f"one thread hashes {res['sha256_gbps_one_thread']:.2f} GB/s.", ""])
    (a.out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
