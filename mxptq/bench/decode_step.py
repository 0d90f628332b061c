"""Decode-step benchmark: Llama-3.1-8B-shaped projections, eager and under torch.compile.

    python -m mxptq.bench.decode_step [--layers 4] [--tokens 1,16] [--out FILE.md]

Each "layer" holds the seven Llama-3.1-8B projections (q, k, v, o, gate, up, down) and runs
x += o(q(x) + [k(x), v(x), k(x), v(x)]); x += down(silu(gate(x)) * up(x)) (no norms or
attention: the linears are what differs). The same weights run as bf16 nn.Linear and as nvfp4
PackedLinear, each eager and compiled with torch.compile(mode="reduce-overhead") (CUDA graphs);
times are per step (all layers), CUDA events over repeated steps after warm-up, in one run.
Eager PackedLinear calls use bound launches (one allocation and a direct kernel launch a
call, docs/runtime.md); the compiled model sees one `mxptq::packed_linear` operator per layer
and CUDA graphs replay the launches.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

from mxptq.runtime import linear_weight_bytes, pack_linears

PROJ = {  # name: (out, in) of Llama-3.1-8B
    "q": (4096, 4096),
    "k": (1024, 4096),
    "v": (1024, 4096),
    "o": (4096, 4096),
    "gate": (14336, 4096),
    "up": (14336, 4096),
    "down": (4096, 14336),
}


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name, (n, k) in PROJ.items():
            lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
            nn.init.normal_(lin.weight, std=0.5 / k**0.5)
            setattr(self, name, lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, v = self.k(x), self.v(x)
        x = x + self.o(self.q(x) + torch.cat([k, v, k, v], dim=-1))
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


def _step_time(fn, x: torch.Tensor, steps: int) -> float:
    """Microseconds per call, CUDA events around `steps` back-to-back calls after warm-up."""
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / steps


def run(layers: int, tokens: list[int], steps: int) -> list[str]:
    torch.manual_seed(0)
    dense = nn.Sequential(*[Layer() for _ in range(layers)]).cuda().eval()
    packed = nn.Sequential(*[Layer() for _ in range(layers)]).cuda().eval()
    packed.load_state_dict(dense.state_dict())
    pack_linears(packed, "nvfp4", "absmax", skip=())
    mem = linear_weight_bytes(packed)
    lines = [
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}",
        f"{layers} layers of Llama-3.1-8B projections; linear weights {mem.bytes / 2**20:.0f} MiB"
        f" packed vs {mem.bf16_bytes / 2**20:.0f} MiB bf16",
        "",
        "| tokens | bf16 eager us | nvfp4 eager us | bf16 compiled us | nvfp4 compiled us | "
        "compiled speedup | compiled vs eager (nvfp4) | rel diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with torch.no_grad():
        cd = torch.compile(dense, mode="reduce-overhead", fullgraph=True)
        cp = torch.compile(packed, mode="reduce-overhead", fullgraph=True)
        for m in tokens:
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            t = [_step_time(f, x, steps) for f in (dense, packed, cd, cp)]
            ref, got = packed(x).float(), cp(x).clone().float()
            diff = float((got - ref).norm() / ref.norm())
            lines.append(
                f"| {m} | {t[0]:.1f} | {t[1]:.1f} | {t[2]:.1f} | {t[3]:.1f} | "
                f"{t[2] / t[3]:.2f}x | {t[1] / t[3]:.2f}x | {diff:.1e} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_step needs a CUDA GPU", file=sys.stderr)
        return 1
    lines = run(a.layers, [int(v) for v in a.tokens.split(",")], a.steps)
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
