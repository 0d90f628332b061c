"""Source dialects: how the input checkpoint stores its weights, and their exact decoding.

Models are often published already quantized: FP8 E4M3 with 128x128 block scales (DeepSeek-V3,
Kimi-K2, Qwen3-FP8: `quant_method: fp8`), compressed-tensors FP8 or FP4, ModelOpt FP8 or NVFP4,
gpt-oss MXFP4. `open_source` reads config.json and the safetensors headers (no tensor data) and
returns a `Source`: the list of *logical* dense tensors the planner sees (a Linear's `weight`
with its true shape, a fused expert tensor in the layout transformers' model uses), and for each
one stored quantized, the physical tensors that hold it. The pipeline's reader calls
`Source.read`, which decodes them into their true values before anything is quantized, so
neither the plan nor the quantizer knows about source formats. Scale tensors are consumed here
and never reach the output; activation and KV-cache scales of the source are dropped.

What "true values" means, per dialect (each producer's own dequantization, computed without
rounding where the product fits fp32):
- FP8 (`fp8`, compressed-tensors `float-quantized`, ModelOpt FP8): w = fp8 · scale in fp32, the
  scale broadcast over its block (DeepSeek-V3 `README_WEIGHTS.md`, "FP8 Weight Documentation":
  `(128x128 weight block) * weight_scale_inv`, edge blocks partial; transformers
  `integrations/finegrained_fp8.py::Fp8Dequantize._dequantize_one`, fp32 product). Exact for
  bf16/fp16 scales, correctly rounded for fp32 scales.
- FP4 with E4M3 scales and an fp32 global (compressed-tensors `nvfp4-pack-quantized`, mxptq
  native): w = e2m1 · (s / g), compressed-tensors `quantization/lifecycle/forward_helpers.py::
  _dequantize` (and `mxptq.dequantize`); ModelOpt NVFP4: w = e2m1 · (s · weight_scale_2),
  modelopt `qtensor/nvfp4_tensor.py::NVFP4QTensor.dequantize`. MXFP4: e2m1 · 2^(e-127), exact.
- gpt-oss MXFP4 (`*_blocks` / `*_scales`): exactly transformers `integrations/mxfp4.py::
  convert_moe_packed_tensors` (bf16, low nibble first, then [E, out, in] -> [E, in, out]).
Decoded weights go to the quantizer in fp32 (gpt-oss: bf16, which holds them exactly); a decoded
weight the plan keeps dense is written in the model's dtype (config `torch_dtype`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import MxptqError
from ..formats import Format, e2m1_decode, get_format, unpack_e2m1
from .dialects import Native, is_native_config
from .safetensors_io import TensorInfo, read_tensor

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")
MODEL_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# Tensors that only a quantized checkpoint holds: in a source that does not consume them they
# mean the config and the tensors disagree (mixed or unknown dialects).
_ARTEFACT = re.compile(
    r"\.(weight_scale_inv|weight_scale|weight_scale_2|weight_global_scale|input_global_scale|"
    r"input_scale|weight_packed|weight_zero_point|weight_shape|k_scale|v_scale|pre_quant_scale)$"
)
# Source tensors that describe activations or the KV cache, not weights: dropped.
_ACTIVATION = re.compile(r"\.(input_scale|input_global_scale|k_scale|v_scale|output_scale)$")


# --------------------------------------------------------------------------------------------
# Decoders: true values from stored tensors (also used by the tests as the reference).


def _scale_values(s: torch.Tensor) -> torch.Tensor:
    """fp32 values of a scale tensor; E8M0 (read as uint8 biased exponents) is 2^(e-127)."""
    if s.dtype == torch.uint8:
        return torch.exp2(s.float() - 127.0)
    return s.float()


def decode_fp8(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp8 weight [..., N, K] times its scales, one per block of `block` = (rows, cols) (edge
    blocks partial), in fp32; `s` is [..., ceil(N/rows), ceil(K/cols)] or anything of that
    many elements."""
    n, k = w.shape[-2:]
    bn, bk = block
    grid = (*w.shape[:-2], -(-n // bn), -(-k // bk))
    sf = _scale_values(s).reshape(grid)
    sf = sf.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return w.float() * sf


def decode_fp4(codes: torch.Tensor, scales: torch.Tensor, glob: torch.Tensor | None,
               fmt: Format, global_is_decode: bool = False) -> torch.Tensor:
    """Packed E2M1 [N, K/2] with block scales [N, K/B] (and a global scale) in fp32:
    e2m1 · (s / g) for an encode global g (compressed-tensors, native), e2m1 · (s · g) for a
    decode multiplier (ModelOpt `weight_scale_2`)."""
    n, k = codes.shape[0], codes.shape[1] * 2
    b = fmt.block_size
    s = fmt.scale.decode(fmt.scale.from_storage(scales))
    if glob is not None:
        g = glob.reshape(()).float()
        s = s * g if global_is_decode else s / g
    q = e2m1_decode(unpack_e2m1(codes)).view(n, k // b, b)
    return (q * s.unsqueeze(-1)).view(n, k)


def decode_gptoss(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-oss MXFP4 `*_blocks` [E, R, G, 16] and `*_scales` [E, R, G] to bf16 [E, G*32, R]
    (exact: two significant bits times a power of two), one expert at a time."""
    e, r, g, _ = blocks.shape
    out = torch.empty((e, g * 32, r), dtype=torch.bfloat16, device=blocks.device)
    for i in range(e):
        v = e2m1_decode(unpack_e2m1(blocks[i])).view(r, g, 32)
        v = v * _scale_values(scales[i]).unsqueeze(-1)
        out[i] = v.view(r, g * 32).t().to(torch.bfloat16)
    return out


# --------------------------------------------------------------------------------------------
# What the planner sees, and how the reader decodes it.


@dataclass(frozen=True)
class Packed:
    """One logical dense tensor that the source stores quantized."""

    kind: str  # "fp8", "fp4" or "gptoss"
    parts: tuple[TensorInfo, ...]  # fp8: weight, scale; fp4: codes, scales[, global]; gptoss
    block: tuple[int, int] = (1, 1)  # fp8: rows x cols sharing one scale
    fmt: Format | None = None  # fp4
    global_is_decode: bool = False  # fp4: the global is ModelOpt's decode multiplier

    def decode(self, t: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == "fp8":
            return decode_fp8(t[0], t[1], self.block)
        if self.kind == "fp4":
            return decode_fp4(t[0], t[1], t[2] if len(t) > 2 else None, self.fmt,
                              self.global_is_decode)
        return decode_gptoss(t[0], t[1])


@dataclass
class Source:
    """The input checkpoint as the planner sees it: logical tensors, and how the packed ones
    are decoded."""

    name: str = "dense"  # dense, fp8, compressed-tensors, modelopt, mxfp4 (gpt-oss), mxptq
    describe: str = "dense bf16/fp16/fp32 weights"
    tensors: list[TensorInfo] = field(default_factory=list)
    packed: dict[str, Packed] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # activation / KV-cache scales
    dtype: str = "BF16"  # what a decoded weight kept dense is written in
    model_dir: Path | None = None

    def nbytes(self, info: TensorInfo) -> int:
        """Bytes the source stores for this logical tensor."""
        p = self.packed.get(info.name)
        return info.nbytes if p is None else sum(t.nbytes for t in p.parts)

    def read(self, fd: int, info: TensorInfo, pin: bool = False,
             device: torch.device | None = None, keep: bool = False) -> torch.Tensor:
        """The tensor's true values. `fd` is open on `info.shard`. A packed tensor is decoded on
        `device` when it is a GPU (the same bytes as on the CPU: only exact conversions and
        single IEEE multiplications); a decoded tensor headed to be kept dense (`keep`) comes
        back in the model's dtype, one headed to the quantizer in fp32 (gpt-oss: bf16)."""
        p = self.packed.get(info.name)
        if p is None:
            return read_tensor(fd, info, pin)
        gpu = device is not None and device.type == "cuda"
        parts = [self._part(fd, info.shard, t, gpu) for t in p.parts]
        if gpu:
            parts = [t.to(device, non_blocking=True) for t in parts]
        w = p.decode(parts)
        return w.to(_TORCH[self.dtype]) if keep else w

    def _part(self, fd: int, shard: str, t: TensorInfo, pin: bool) -> torch.Tensor:
        if t.dtype == "F8_E8M0":  # no torch dtype to read it as: its bytes are the exponents
            t = replace(t, dtype="U8")
        if t.shard == shard:
            return read_tensor(fd, t, pin)
        other = os.open(self.model_dir / t.shard, os.O_RDONLY)  # a scale in the next shard
        try:
            return read_tensor(other, t, pin)
        finally:
            os.close(other)


# --------------------------------------------------------------------------------------------
# Detection: config.json says which dialect; every tensor must agree with it.


def _fail(info: TensorInfo, why: str) -> MxptqError:
    return MxptqError(f"tensor {info.name} ({info.shard}): {why}")


def _shape(t: TensorInfo) -> str:
    return f"{t.dtype}{list(t.shape)}"


class _Claims:
    """Collects the logical tensors of one source while checking every physical tensor."""

    def __init__(self, infos: list[TensorInfo], dtype: str, method: str):
        self.by_name = {i.name: i for i in infos}
        self.infos, self.dtype, self.method = infos, dtype, method
        self.packed: dict[str, Packed] = {}
        self.logical: dict[str, TensorInfo] = {}  # keyed by the physical tensor it replaces
        self.used: set[str] = set()
        self.dropped: list[str] = []

    def need(self, owner: TensorInfo, name: str, what: str) -> TensorInfo:
        t = self.by_name.get(name)
        if t is None:
            raise _fail(owner, f"{what} {name} is missing (config.json: quant_method "
                               f"{self.method!r})")
        return t

    def add(self, main: TensorInfo, name: str, shape: tuple[int, ...], packed: Packed) -> None:
        if name != main.name and name in self.by_name:
            raise _fail(self.by_name[name], f"stored both dense and packed ({main.name})")
        self.logical[main.name] = TensorInfo(name, main.shard, self.dtype, shape, main.offset)
        self.packed[name] = packed
        self.used.update(t.name for t in packed.parts)

    def finish(self, name: str, describe: str, model_dir: Path) -> Source:
        """The logical tensors in header order; any quantization artefact nobody consumed is an
        error naming it."""
        out = []
        for info in self.infos:
            if info.name in self.logical:
                out.append(self.logical[info.name])
            elif info.name in self.used:
                continue
            elif _ACTIVATION.search(info.name) and self.method != "none":
                self.dropped.append(info.name)
            elif info.dtype in FP8_DTYPES or info.dtype == "F8_E8M0" or _ARTEFACT.search(
                    info.name) or (info.name.endswith(("_blocks", "_scales"))
                                   and info.dtype == "U8"):
                raise _fail(info, f"{_shape(info)} looks quantized, but "
                                  f"{_unexplained(self.method)}")
            else:
                out.append(info)
        return Source(name, describe, out, self.packed, self.dropped, self.dtype, model_dir)


def _unexplained(method: str) -> str:
    if method == "none":
        return "config.json has no quantization_config saying how to decode it"
    return (f"config.json's quant_method {method!r} does not account for it (mixed or unknown "
            "source dialects)")


def _fp8(c: _Claims, w: TensorInfo, scale_name: str, kind: str,
         block: tuple[int, int] | None = None) -> None:
    """One FP8 weight and its scale, the scale's shape checked against the granularity."""
    s = c.need(w, scale_name, "its scale")
    if len(w.shape) < 2:
        raise _fail(w, f"FP8 weight {_shape(w)} is not a matrix")
    if s.dtype not in SCALE_DTYPES:
        raise _fail(s, f"scale dtype {s.dtype} (expected one of {', '.join(SCALE_DTYPES)})")
    n, k = w.shape[-2:]
    lead = w.shape[:-2]
    if kind == "auto":  # ModelOpt MIXED_PRECISION: granularity from the scale's shape
        numel = math.prod(s.shape)
        kind = "tensor" if numel == 1 else "channel" if s.shape in ((n,), (n, 1)) else "block"
        block = block or (128, 128)
    bn, bk = {"tensor": (n, k), "channel": (1, k)}.get(kind, block)
    if kind == "tensor":
        ok = math.prod(s.shape) == 1 and not lead
    elif kind == "channel":
        ok = s.shape in ((n,), (n, 1)) and not lead
    else:
        ok = s.shape == (*lead, -(-n // bn), -(-k // bk))
    if not ok:
        want = {"tensor": "one element", "channel": f"[{n}] or [{n}, 1]"}.get(
            kind, f"{[*lead, -(-n // bn), -(-k // bk)]} ({bn}x{bk} blocks)")
        raise _fail(s, f"scale of shape {list(s.shape)} for weight {w.name} {list(w.shape)}, "
                       f"expected {want}")
    c.add(w, w.name, w.shape, Packed("fp8", (w, s), (bn, bk)))


def _fp4(c: _Claims, codes: TensorInfo, fmt: Format, scale: str, glob: str | None,
         global_is_decode: bool = False) -> None:
    """One packed FP4 Linear `P`: codes U8 [N, K/2] (`P.<codes>`), block scales `P.<scale>`
    [N, K/B], and, for a format with one, the one-element global scale `P.<glob>`."""
    module = codes.name.rpartition(".")[0]
    if codes.dtype != "U8" or len(codes.shape) != 2:
        raise _fail(codes, f"packed FP4 weight {_shape(codes)}, expected U8 [N, K/2] "
                           "(integer pack-quantized checkpoints are not a source mxptq decodes)")
    n, k = codes.shape[0], codes.shape[1] * 2
    s = c.need(codes, f"{module}.{scale}", "its block scales")
    sdt = "F8_E4M3" if fmt.scale.torch_dtype is not None else "U8"
    if s.shape != (n, k // fmt.block_size) or s.dtype != sdt:
        raise _fail(s, f"block scales {_shape(s)} for packed weight {codes.name} "
                       f"{list(codes.shape)}, expected {sdt}{[n, k // fmt.block_size]} "
                       f"({fmt.name}, block {fmt.block_size})")
    parts = [codes, s]
    if fmt.has_global and glob:
        g = c.need(codes, f"{module}.{glob}", "its global scale")
        if math.prod(g.shape) != 1 or g.dtype not in ("F32", "BF16", "F16"):
            raise _fail(g, f"global scale {_shape(g)}, expected one float")
        parts.append(g)
    c.add(codes, f"{module}.weight", (n, k), Packed("fp4", tuple(parts), fmt=fmt,
                                                     global_is_decode=global_is_decode))


# -- quant_method: fp8 (DeepSeek-V3 / Kimi-K2 / Qwen3-FP8; vLLM `quantization/fp8.py`) --------


def _source_fp8(c: _Claims, qc: dict) -> str:
    block = qc.get("weight_block_size")
    if block is not None and (len(block) != 2 or min(block) < 1):
        raise MxptqError(f"quantization_config.weight_block_size {block}: expected [rows, cols]")
    for w in c.infos:
        if w.dtype not in FP8_DTYPES:
            continue
        if block:  # vLLM Fp8LinearMethod: `weight_scale_inv` per block
            _fp8(c, w, f"{w.name}_scale_inv", "block", tuple(block))
        else:  # per tensor: `weight_scale`
            _fp8(c, w, f"{w.name}_scale", "tensor")
    if block:
        return f"FP8 E4M3, {block[0]}x{block[1]} block scales (weight_scale_inv)"
    return "FP8 E4M3, per-tensor scales (weight_scale)"


# -- compressed-tensors: float-quantized FP8, nvfp4/mxfp4-pack-quantized ----------------------

_CT_FP4 = {"nvfp4-pack-quantized": "nvfp4", "mxfp4-pack-quantized": "mxfp4"}
_CT_FORMATS = ("float-quantized", "naive-quantized", "dense", *_CT_FP4)


def _ct_groups(qc: dict) -> tuple[set[str], list[tuple]]:
    """The FP4 formats and the FP8 weight schemes (strategy, block) the config names."""
    if qc.get("quantization_status", "compressed") != "compressed":
        raise MxptqError(f"compressed-tensors quantization_status "
                         f"{qc.get('quantization_status')!r}: only compressed checkpoints are "
                         "a source mxptq decodes")
    if qc.get("sparsity_config"):
        raise MxptqError("compressed-tensors sparsity_config: sparse checkpoints are not a "
                         "source mxptq decodes")
    fp4, fp8 = set(), []
    for name, g in (qc.get("config_groups") or {}).items():
        fmt = g.get("format") or qc.get("format")
        if fmt not in _CT_FORMATS:
            raise MxptqError(f"compressed-tensors format {fmt!r} (group {name}) is not a source "
                             f"mxptq decodes ({', '.join(_CT_FORMATS)})")
        w = g.get("weights") or {}
        if fmt in _CT_FP4:
            fp4.add(_CT_FP4[fmt])
        elif w.get("num_bits") == 8 and w.get("type") == "float":
            strat = w.get("strategy")
            if strat not in ("tensor", "channel", "group", "block"):
                raise MxptqError(f"compressed-tensors FP8 strategy {strat!r} (group {name}) "
                                 "is not a source mxptq decodes")
            if strat == "block":
                blk = tuple(w.get("block_structure") or ())
            elif strat == "group":
                blk = (1, int(w["group_size"]))
            else:
                blk = None
            fp8.append((strat, blk))
        elif w:
            raise MxptqError(f"compressed-tensors weights of {w.get('num_bits')}-bit "
                             f"{w.get('type')} (group {name}) are not a source mxptq decodes")
    return fp4, sorted(set(fp8), key=str)


def _source_ct(c: _Claims, qc: dict) -> str:
    fp4, fp8 = _ct_groups(qc)
    if len(fp8) > 1:
        raise MxptqError(f"compressed-tensors config_groups hold several FP8 weight schemes "
                         f"{fp8}; mxptq decodes one")
    kinds = []
    for t in c.infos:
        if t.name.endswith(".weight_packed"):
            if not fp4:
                raise _fail(t, "a packed FP4 weight, but no config group has an FP4 format")
            has_g = f"{t.name[: -len('_packed')]}_global_scale" in c.by_name
            name = ("nvfp4" if has_g else "mxfp4") if len(fp4) != 1 else next(iter(fp4))
            _fp4(c, t, get_format(name), "weight_scale", "weight_global_scale")
            kinds.append(name)
    for t in c.infos:
        if t.dtype in FP8_DTYPES and t.name not in c.used:  # (NVFP4 block scales are F8 too)
            if not fp8:
                raise _fail(t, "an FP8 weight, but no config group is 8-bit float")
            if f"{t.name}_zero_point" in c.by_name:
                raise _fail(c.by_name[f"{t.name}_zero_point"],
                            "asymmetric FP8 (a zero point) is not a source mxptq decodes")
            strat, blk = fp8[0]
            _fp8(c, t, f"{t.name}_scale", "block" if blk else strat, blk)
            kinds.append(f"FP8 ({strat})")
    names = ", ".join(sorted(set(kinds))) or "nothing quantized"
    return f"compressed-tensors: {names}"


# -- ModelOpt (hf_quant_config.json / quant_method modelopt) ----------------------------------

_MODELOPT_FP8 = {"FP8": "tensor", "FP8_PER_CHANNEL_PER_TOKEN": "channel", "FP8_PB_WO": "block"}
_MODELOPT_FP4 = ("NVFP4", "W4A16_NVFP4")


def _source_modelopt(c: _Claims, qc: dict) -> str:
    algo = qc.get("quant_algo")
    algos = {algo}
    if algo == "MIXED_PRECISION":
        algos = {v.get("quant_algo") for v in (qc.get("quantized_layers") or {}).values()}
    bad = sorted(str(a) for a in algos if a not in (*_MODELOPT_FP8, *_MODELOPT_FP4))
    if bad:
        raise MxptqError(f"modelopt quant_algo {bad[0]!r} is not a source mxptq decodes "
                         f"({', '.join([*_MODELOPT_FP8, *_MODELOPT_FP4, 'MIXED_PRECISION'])})")
    fp8_kind = _MODELOPT_FP8.get(algo, "auto")
    for t in c.infos:
        if t.name.endswith(".pre_quant_scale"):
            raise _fail(t, "AWQ pre-quant scales are not a source mxptq decodes")
        if not t.name.endswith(".weight"):
            continue
        module = t.name[: -len(".weight")]
        if t.dtype == "U8" and f"{module}.weight_scale_2" in c.by_name:
            _fp4(c, t, get_format("nvfp4"), "weight_scale", "weight_scale_2",
                 global_is_decode=True)
        elif t.dtype in FP8_DTYPES:
            _fp8(c, t, f"{t.name}_scale", fp8_kind, (128, 128) if fp8_kind == "block" else None)
    return f"ModelOpt {algo}"


# -- gpt-oss MXFP4 (quant_method mxfp4; transformers integrations/mxfp4.py) -------------------


def _source_gptoss(c: _Claims, qc: dict) -> str:
    for b in c.infos:
        if not b.name.endswith("_blocks"):
            continue
        base = b.name[: -len("_blocks")]
        s = c.need(b, f"{base}_scales", "its scales")
        if b.dtype != "U8" or len(b.shape) != 4 or b.shape[-1] != 16:
            raise _fail(b, f"MXFP4 blocks {_shape(b)}, expected U8 [E, rows, K/32, 16]")
        if s.dtype != "U8" or s.shape != b.shape[:-1]:
            raise _fail(s, f"MXFP4 scales {_shape(s)} for blocks {list(b.shape)}, expected "
                           f"U8{list(b.shape[:-1])}")
        e, r, g, _ = b.shape
        c.add(b, base, (e, g * 32, r), Packed("gptoss", (b, s)))
    return "gpt-oss MXFP4 experts (*_blocks / *_scales)"


# -- mxptq's own native dialect ---------------------------------------------------------------


def _source_native(c: _Claims, qc: dict) -> str:
    try:
        fmt = Native().format_from_config(qc)
    except (KeyError, ValueError, TypeError) as e:
        raise MxptqError(f"quantization_config (quant_method mxptq): unreadable ({e})") from e
    for t in c.infos:
        if t.name.endswith(".weight_packed"):
            _fp4(c, t, fmt, "weight_scale", "weight_global_scale")
    return f"mxptq native {fmt.name} block {fmt.block_size}"


_SOURCES: dict[str, Callable[[_Claims, dict], str]] = {
    "fp8": _source_fp8,
    "compressed-tensors": _source_ct,
    "modelopt": _source_modelopt,
    "mxfp4": _source_gptoss,
    "mxptq": _source_native,
}


def source_config(model_dir: Path) -> tuple[dict, dict | None]:
    """config.json and the source's quantization config (ModelOpt's legacy
    hf_quant_config.json when config.json has none, as vLLM reads it)."""
    if not (model_dir / "config.json").is_file():
        raise MxptqError(f"{model_dir}: no config.json")
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise MxptqError(f"{model_dir / 'config.json'}: cannot read ({e})") from e
    qc = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get(
        "quantization_config")
    legacy = model_dir / "hf_quant_config.json"
    if not qc and legacy.is_file():
        try:
            q = json.loads(legacy.read_text())["quantization"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MxptqError(f"{legacy}: unreadable ({e})") from e
        qc = {"quant_method": "modelopt", "quant_algo": q.get("quant_algo"),
              "quantized_layers": q.get("quantized_layers")}
    return cfg, qc


def model_dtype(cfg: dict) -> str:
    """The safetensors dtype a decoded weight kept dense is written in."""
    for c in (cfg, cfg.get("text_config") or {}):
        d = c.get("torch_dtype") or c.get("dtype")
        if d in MODEL_DTYPES:
            return MODEL_DTYPES[d]
    return "BF16"


def open_source(model_dir: Path, infos: list[TensorInfo]) -> Source:
    """Detect the source dialect from config.json and check every tensor against it (headers
    only); raise MxptqError naming the tensor when they disagree."""
    cfg, qc = source_config(model_dir)
    method = (qc or {}).get("quant_method", "none") if qc else "none"
    if is_native_config(qc):  # native version 2 names no quant_method (dialects.Native.config)
        method = "mxptq"
    if isinstance(method, str) and method.startswith("modelopt"):
        method = "modelopt"
    if method != "none" and method not in _SOURCES:
        raise MxptqError(
            f"{model_dir / 'config.json'}: quantization_config.quant_method {method!r} is not a "
            f"source mxptq decodes ({', '.join(_SOURCES)}, or dense weights)"
        )
    c = _Claims(infos, model_dtype(cfg), method)
    describe = _SOURCES[method](c, qc) if method != "none" else "dense weights"
    return c.finish("dense" if method == "none" else method, describe, model_dir)
