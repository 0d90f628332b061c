"""Synthetic source checkpoints for the source-dialect tests, written from known bf16 weights of
tiny random models following each published layout, together with the reference decoding of
every stored tensor by the client that defines it (transformers, compressed-tensors, or the
producer's own formula). `write_reference` turns the decoding into a dense checkpoint with the
same shards, which `mxptq quantize` must turn into the same bytes as the source itself."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import save_file

from mxptq.checkpoint import read_checkpoint
from mxptq.tensor import dequantize

BF16 = torch.bfloat16
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=128, tie_word_embeddings=False)
DEEPSEEK = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                vocab_size=128, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1,
                tie_word_embeddings=False)
QWEN3_MOE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=128, num_experts=4, num_experts_per_tok=2,
                 tie_word_embeddings=False)
GPT_OSS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=128, num_local_experts=4,
               num_experts_per_tok=2, tie_word_embeddings=False)
MODELS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, LLAMA),
    "deepseek_v3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM, DEEPSEEK),
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, QWEN3_MOE),
    "gpt_oss": (T.GptOssConfig, T.GptOssForCausalLM, GPT_OSS),
}


def tiny(arch: str, tmp: Path, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """bf16 weights (heavier tails than the default init, like trained weights) and config of
    a tiny random model, with transformers' checkpoint names (per-expert MoE projections)."""
    from safetensors.torch import load_file

    cfg_cls, cls, kw = MODELS[arch]
    torch.manual_seed(seed)
    model = cls(cfg_cls(**kw, dtype="bfloat16")).to(BF16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 3 * torch.rand_like(p) ** 8)
    folder = tmp / f"hf-{arch}"
    model.save_pretrained(folder)  # transformers' own checkpoint names and config
    sd = {}
    for p in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(p))
    cfg = json.loads((folder / "config.json").read_text())
    return sd, cfg


# --------------------------------------------------------------------------------------------
# Encoders (the published layouts) and reference decoders (the clients)


def pad_blocks(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    n, k = w.shape
    pad = torch.zeros(-(-n // bn) * bn, -(-k // bk) * bk)
    pad[:n, :k] = w.float()
    return pad.view(pad.shape[0] // bn, bn, pad.shape[1] // bk, bk)


def fp8_block_encode(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 README_WEIGHTS.md, "FP8 Weight Documentation": one fp32 scale per block
    (edge blocks zero-padded), weight / scale cast to E4M3; the scale is `weight_scale_inv`."""
    n, k = w.shape
    blocks = pad_blocks(w, bn, bk)
    s = blocks.abs().amax(dim=(1, 3)) / 448
    q = (blocks / s[:, None, :, None]).reshape(blocks.shape[0] * bn, -1)[:n, :k]
    return q.to(torch.float8_e4m3fn), s


def ct_fp8_encode(w: torch.Tensor, strategy: str, block=(16, 24)):
    """compressed-tensors' own FloatQuantizationCompressor on a bf16 amax/448 scale (the
    scale dtype CT gives an FP8 weight of a bf16 model)."""
    from compressed_tensors.compressors.naive_quantized.base import (
        FloatQuantizationCompressor,
    )

    scheme = ct_scheme(strategy, block)
    if strategy == "tensor":
        s = (w.abs().amax().float() / 448).to(BF16).reshape(1)
    elif strategy == "channel":
        s = (w.abs().amax(dim=1, keepdim=True).float() / 448).to(BF16)
    else:
        s = (pad_blocks(w, *block).abs().amax(dim=(1, 3)) / 448).to(BF16)
    out = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": s}, scheme)
    return out["weight"], out["weight_scale"], scheme


def ct_scheme(strategy: str, block=(16, 24)):
    from compressed_tensors.quantization import preset_name_to_scheme

    preset = {"tensor": "FP8", "channel": "FP8_DYNAMIC", "block": "FP8_BLOCK"}[strategy]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if strategy == "block":
        scheme = scheme.model_copy(update={"weights": scheme.weights.model_copy(
            update={"block_structure": list(block)})})
    return scheme


def ct_fp8_decode(q: torch.Tensor, s: torch.Tensor, args) -> torch.Tensor:
    """compressed-tensors `dequantize` with the scale in fp32: its exact fp32 product."""
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    return ct_dequantize(q, s.float(), args=args, dtype=torch.float32)


def block_args(bn: int, bk: int):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", strategy="block",
                            block_structure=[bn, bk])


def mxfp4_gptoss_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss experts [E, in, out] -> `*_blocks` U8 [E, out, in/32, 16] (low nibble = even
    element) and `*_scales` U8 [E, out, in/32] (E8M0), the layout transformers
    integrations/mxfp4.py::convert_moe_packed_tensors reads (values by mxptq's mxfp4 absmax)."""
    from mxptq.tensor import quantize_tensor

    e, k, r = w.shape
    rows = w.transpose(1, 2).reshape(e * r, k)
    qt = quantize_tensor(rows, "mxfp4", "absmax")
    return qt.codes.view(e, r, k // 32, 16), qt.scales.view(e, r, k // 32)


def modelopt_nvfp4_decode(codes, scale, scale_2) -> torch.Tensor:
    """modelopt NVFP4QTensor.dequantize: e2m1 · (scale.float() · weight_scale_2)."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    n, k = codes.shape[0], codes.shape[1] * 2
    q = unpack_fp4_from_uint8(codes, n, k, dtype=torch.float32)
    s = scale.float() * scale_2.float()
    return (q.view(n, -1, 16) * s.unsqueeze(-1)).view(n, k)


# --------------------------------------------------------------------------------------------
# Source checkpoints


@dataclass
class Pair:
    """A source checkpoint and what it means: the decoded value of every logical tensor."""

    src: Path
    config: dict  # the source's config without its quantization_config
    decoded: dict[str, torch.Tensor] = field(default_factory=dict)
    packed: set[str] = field(default_factory=set)  # logical names stored quantized
    shard_of: dict[str, int] = field(default_factory=dict)  # logical name -> shard index


def save_sharded(folder: Path, tensors: dict[str, torch.Tensor], config: dict,
                 shard_of: dict[str, int], extra: dict | None = None) -> None:
    """Shards by the given assignment, with an index and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    n = max(shard_of.values()) + 1
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, fname in enumerate(names):
        part = {k: v.contiguous() for k, v in tensors.items() if shard_of[k] == i}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: names[shard_of[k]] for k in tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name, content in (extra or {}).items():
        (folder / name).write_text(json.dumps(content))


def _spread(names: list[str], shards: int = 3) -> dict[str, int]:
    ordered = sorted(names)
    return {k: i * shards // len(ordered) for i, k in enumerate(ordered)}


def _is_linear(name: str, t: torch.Tensor) -> bool:
    return name.endswith("proj.weight") and t.dim() == 2


def make_fp8_block(tmp: Path, arch: str = "deepseek_v3", block=(16, 24)) -> Pair:
    """quant_method fp8 with weight_block_size (DeepSeek-V3 / Kimi-K2 / Qwen3-FP8): every
    projection E4M3 + fp32 `weight_scale_inv`; router, norms, embeddings, head stay bf16. One
    scale is stored in another shard than its weight. `block=None`: the per-tensor variant
    (vLLM Fp8LinearMethod without block quantization: a one-element `weight_scale`)."""
    sd, cfg = tiny(arch, tmp)
    pair = Pair(tmp / "src", dict(cfg))
    phys = {}
    suffix = "_scale_inv" if block else "_scale"
    for k, v in sd.items():
        if _is_linear(k, v):
            if block:
                q, s = fp8_block_encode(v, *block)
                pair.decoded[k] = ct_fp8_decode(q, s, block_args(*block))
            else:
                s = (v.abs().amax().float() / 448).reshape(1)
                q = (v.float() / s).to(torch.float8_e4m3fn)
                pair.decoded[k] = q.float() * s
            phys[k], phys[f"{k}{suffix}"] = q, s
            pair.packed.add(k)
        else:
            phys[k] = pair.decoded[k] = v
    shard_of = _spread(list(phys))
    first = sorted(pair.packed)[0]
    shard_of[f"{first}{suffix}"] = (shard_of[first] + 1) % 3  # a scale in another shard
    pair.shard_of = {k: shard_of[k] for k in pair.decoded}
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
          "weight_block_size": list(block) if block else None}
    save_sharded(pair.src, phys, dict(cfg, quantization_config=qc), shard_of)
    return pair


def make_ct_fp8(tmp: Path, strategy: str, arch: str = "llama") -> Pair:
    """compressed-tensors `float-quantized` FP8 (presets FP8 / FP8_DYNAMIC / FP8_BLOCK),
    written by compressed-tensors' compressor; `lm_head` in `ignore`. The static FP8 preset
    also stores an `input_scale` per Linear, which mxptq drops."""
    from compressed_tensors.quantization import QuantizationConfig

    sd, cfg = tiny(arch, tmp)
    pair = Pair(tmp / "src", dict(cfg))
    phys = {}
    scheme = None
    for k, v in sd.items():
        if _is_linear(k, v):
            q, s, scheme = ct_fp8_encode(v, strategy)
            phys[k], phys[f"{k}_scale"] = q, s
            if scheme.input_activations is not None and not scheme.input_activations.dynamic:
                phys[k.replace(".weight", ".input_scale")] = torch.tensor([0.02], dtype=BF16)
            pair.decoded[k] = ct_fp8_decode(q, s, scheme.weights)
            pair.packed.add(k)
        else:
            phys[k] = pair.decoded[k] = v
    shard_of = _spread(list(phys))
    pair.shard_of = {k: shard_of[k] for k in pair.decoded}
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="float-quantized",
                            ignore=["lm_head"], quantization_status="compressed").model_dump()
    save_sharded(pair.src, phys, dict(cfg, quantization_config=qc), shard_of)
    return pair


def make_modelopt_fp8(tmp: Path, algo: str = "FP8", arch: str = "llama") -> Pair:
    """ModelOpt FP8 export (export/quant_utils.py::to_quantized_weight, get_scaling_factor):
    `weight` E4M3 = weight / weight_scale, `weight_scale` F32 = amax/448 (per tensor, per
    output channel [N] for FP8_PER_CHANNEL_PER_TOKEN, per 128x128 block for FP8_PB_WO),
    `input_scale` F32; hf_quant_config.json only (legacy)."""
    sd, cfg = tiny(arch, tmp)
    pair = Pair(tmp / "src", dict(cfg))
    phys = {}
    for k, v in sd.items():
        if _is_linear(k, v):
            if algo == "FP8":
                s = (v.abs().amax().float() / 448).reshape(())
                q = (v.float() / s).to(torch.float8_e4m3fn)
                pair.decoded[k] = q.float() * s  # from_quantized_weight, in fp32
            elif algo == "FP8_PER_CHANNEL_PER_TOKEN":
                s = v.abs().amax(dim=1).float() / 448  # [N]
                q = (v.float() / s[:, None]).to(torch.float8_e4m3fn)
                pair.decoded[k] = q.float() * s[:, None]
            else:
                q, s = fp8_block_encode(v, 128, 128)
                pair.decoded[k] = ct_fp8_decode(q, s, block_args(128, 128))
            phys[k], phys[f"{k}_scale"] = q, s
            phys[k.replace(".weight", ".input_scale")] = torch.tensor(0.01)
            pair.packed.add(k)
        else:
            phys[k] = pair.decoded[k] = v
    shard_of = _spread(list(phys))
    pair.shard_of = {k: shard_of[k] for k in pair.decoded}
    hf = {"producer": {"name": "modelopt", "version": "0.47.0"},
          "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None,
                           "exclude_modules": ["lm_head"]}}
    save_sharded(pair.src, phys, cfg, shard_of, {"hf_quant_config.json": hf})
    return pair


def make_gptoss_mxfp4(tmp: Path) -> Pair:
    """gpt-oss `quant_method: mxfp4`: MoE experts as `*_blocks` / `*_scales`, the rest bf16
    (formats.md-style layout read by transformers integrations/mxfp4.py)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    sd, cfg = tiny("gpt_oss", tmp)
    pair = Pair(tmp / "src", dict(cfg))
    phys = {}
    for k, v in sd.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4_gptoss_encode(v)
            phys[f"{k}_blocks"], phys[f"{k}_scales"] = blocks, scales
            pair.decoded[k] = convert_moe_packed_tensors(blocks, scales, dtype=BF16)
            pair.packed.add(k)
        else:
            phys[k] = pair.decoded[k] = v
    shard_of = _spread(list(phys))
    pair.shard_of = {k: shard_of.get(k, shard_of.get(f"{k}_blocks")) for k in pair.decoded}
    qc = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"]}
    save_sharded(pair.src, phys, dict(cfg, quantization_config=qc), shard_of)
    return pair


def make_fp4(tmp: Path, dialect: str, fmt: str = "nvfp4", arch: str = "llama") -> Pair:
    """FP4 written by mxptq itself in the given dialect (compressed-tensors, modelopt,
    native) from the bf16 model; decoded by the dialect's own definition."""
    from quant_helpers import quantize

    sd, cfg = tiny(arch, tmp)
    dense = tmp / "bf16"
    shard_of = _spread(list(sd))
    save_sharded(dense, sd, cfg, shard_of)
    src = tmp / "src"
    quantize(dense, src, "--format", fmt, "--dialect", dialect, "--scale", "absmax")
    pair = Pair(src, dict(cfg))
    qcfg = json.loads((src / "config.json").read_text())
    if dialect == "modelopt":
        from safetensors import safe_open

        for p in src.glob("*.safetensors"):
            with safe_open(str(p), "pt") as f:
                for k in f.keys():  # noqa: SIM118
                    if k.endswith(".weight_scale_2"):
                        m = k[: -len(".weight_scale_2")]
                        pair.decoded[f"{m}.weight"] = modelopt_nvfp4_decode(
                            f.get_tensor(f"{m}.weight"),
                            f.get_tensor(f"{m}.weight_scale").view(torch.float8_e4m3fn),
                            f.get_tensor(k))
    else:
        for m, qt in read_checkpoint(src).items():
            pair.decoded[f"{m}.weight"] = dequantize(qt)
    pair.packed = set(pair.decoded)
    for k, v in sd.items():
        if k not in pair.decoded:
            pair.decoded[k] = v
    pair.shard_of = dict(shard_of)
    assert qcfg["quantization_config"]
    return pair


def write_reference(pair: Pair, folder: Path, keep: set[str], dtype=BF16) -> Path:
    """The decoded checkpoint: packed tensors as the quantizer gets them (fp32; gpt-oss bf16)
    or, where the plan keeps them dense (`keep`), in the model's dtype; same shards."""
    out = {k: v.to(dtype) if k in pair.packed and k in keep else v
           for k, v in pair.decoded.items()}
    save_sharded(folder, out, pair.config, pair.shard_of)
    return folder
