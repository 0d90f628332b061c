"""Shared pieces of the reliability tests: tiny random checkpoints written by the test, folder
digests, in-process CLI runs, and child processes (forked from a server that has imported
mxptq once) that a test can kill at a named event."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from mxptq.checkpoint.durable import KILL_ENV, reset_events
from mxptq.cli import app


def tiny_llama(folder: Path, layers: int = 2, hidden: int = 64, shard: str | None = "60KB",
               seed: int = 0) -> Path:
    """A random bf16 Llama (fixed seed), in several shards when `shard` is given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=128)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kw)
    (folder / "tokenizer.json").write_text('{"note": "stands in for a tokenizer"}\n')
    return folder


def digest(folder: Path) -> str:
    """Every file's path, mode and bytes below `folder` (links as their target's text)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(oct(p.stat().st_mode).encode() + p.read_bytes())
    return h.hexdigest()


def output_bytes(folder: Path) -> dict[str, bytes]:
    """What must be byte-identical between runs: every file but the report, plus the report's
    per-tensor errors to 6 digits (its timings, memory and versions differ by nature, and an
    error summed by another number of threads in its last bits)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "mxptq_report.json":
            out[str(p.relative_to(folder))] = p.read_bytes()
    rep = json.loads((folder / "mxptq_report.json").read_text())
    errors = [(t["name"], t["shape"], t["group"], f"{t['rel_mse']:.6g}") for t in rep["tensors"]]
    n = rep["quantization_error"]["tensors"]
    out["report:tensors"] = json.dumps([errors, n, rep["kept"]]).encode()
    return out


def siblings(out: Path) -> list[str]:
    """Hidden folders and files a run leaves beside --out."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def cli(*args, env: dict | None = None):
    """`mxptq ARGS` in this process: (exit code, stderr, stdout)."""
    reset_events()
    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    return r.exit_code, r.stderr, r.stdout


def one_error(code: int, err: str, *needles: str, exit_code: int = 2) -> str:
    """The run failed with exactly one `error:` line (no traceback) holding every needle."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == exit_code, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _child(argv: list[str], env: dict, log: str) -> None:
    """Runs in the forked child: the mxptq command line, its stderr in `log` (stdout beside)."""
    os.environ.update(env)
    for fd, path in ((1, log + ".out"), (2, log)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = ["mxptq", *argv]
    from mxptq.__main__ import main

    main()


class Children:
    """Child processes forked from one server that imported mxptq's command line once, so each
    costs a fork, not an interpreter start with torch."""

    def __init__(self):
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["reliability_helpers", "mxptq.quantize_cmd",
                                         "mxptq.pipeline", "mxptq.inspect"])

    def start(self, argv: list, log: Path, kill_at: str | None = None, **env):
        e = {k: str(v) for k, v in env.items()}
        if kill_at:
            e[KILL_ENV] = kill_at
        p = self.ctx.Process(target=_child, args=([str(a) for a in argv], e, str(log)))
        p.start()
        return p

    def run(self, argv: list, log: Path, kill_at: str | None = None, timeout: float = 300,
            **env) -> int:
        """Exit code (negative: the signal that ended it)."""
        p = self.start(argv, log, kill_at, **env)
        p.join(timeout)
        assert p.exitcode is not None, f"child still running: {log.read_text()[-2000:]}"
        return p.exitcode


def same_output(a: dict[str, bytes], b: dict[str, bytes]) -> str | None:
    """None when equal, else the first differing file and where."""
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x != y:
            if x is None or y is None:
                return f"{k}: only in {'second' if x is None else 'first'}"
            i = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q),
                     min(len(x), len(y)))
            return f"{k}: differs at byte {i}: {x[max(0, i - 80):i + 80]!r} vs " \
                   f"{y[max(0, i - 80):i + 80]!r}"
    return None
