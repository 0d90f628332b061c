"""The engine model itself (mxptq/checkpoint/engines.py) against the engines' published rules:
each case is a config/checkpoint pair the engine's source accepts or refuses, by name only."""

import pytest

from mxptq.checkpoint import engines
from mxptq.checkpoint.engines import FAILS, LOADS, NOTE, Layout, Refusal, built_quantized
from mxptq.formats import get_format

L = "model.layers.0"
ATTN = [f"{L}.self_attn.{x}_proj" for x in "qkvo"]
EXPERTS = [f"{L}.mlp.experts.{e}.{p}" for e in range(2) for p in ("gate_proj", "up_proj",
                                                                   "down_proj")]


def moe(**kw) -> Layout:
    """Qwen3-MoE-like: attention and experts packed, router dense, lm_head dense."""
    lay = Layout(packed=set(ATTN + EXPERTS), dense={f"{L}.mlp.gate", "lm_head",
                                                    "model.embed_tokens"},
                 lm_head={"lm_head"}, model_type="qwen3_moe")
    for k, v in kw.items():
        setattr(lay, k, v)
    return lay


def ct(ignore, targets=("Linear",)):
    return {"config_groups": {"group_0": {"targets": list(targets)}}, "ignore": list(ignore)}


def mo(ignore):
    return {"quant_algo": "W4A16_NVFP4", "ignore": list(ignore)}


def status(engine, dialect, qc, lay, fmt="nvfp4"):
    v = {x.engine: x for x in engines.verdicts(dialect, get_format(fmt), qc, lay, False)}
    return v[engine]


def test_what_we_write_loads_and_the_router_must_be_named():
    lay = moe()
    good = engines.ignore_list(lay)
    assert good == ["lm_head", f"{L}.mlp.gate"]  # embeddings need no entry
    for engine in ("vllm", "sglang"):
        assert status(engine, "compressed-tensors", ct(good), lay).status == LOADS
        assert status(engine, "modelopt", mo(good), lay).status == LOADS
    # the bug this module exists for: vLLM builds Qwen3-MoE's router as a Linear with the
    # quantization config (models/qwen3_moe.py), so an unnamed router is expected packed
    for dialect, qc in (("compressed-tensors", ct(["lm_head"])), ("modelopt", mo(["lm_head"]))):
        v = status("vllm", dialect, qc, lay)
        assert v.status == FAILS and f"{L}.mlp.gate is stored dense" in v.why


def test_partially_ignored_fused_layer_is_refused():
    lay = moe(packed=set(ATTN[2:] + EXPERTS), dense={f"{L}.self_attn.q_proj",
                                                     f"{L}.self_attn.k_proj", "lm_head"})
    with pytest.raises(Refusal, match="qkv_proj"):
        built_quantized("vllm", "compressed-tensors", ct([f"{L}.self_attn.q_proj"]), lay)


def test_moe_layer_is_one_scheme_judged_from_expert_zero():
    mixed = moe(packed=set(ATTN + EXPERTS[:-1]), dense={EXPERTS[-1], f"{L}.mlp.gate",
                                                        "lm_head"})
    ig = engines.ignore_list(mixed)
    assert status("vllm", "compressed-tensors", ct(ig), mixed).status == FAILS
    # expert 0's down_proj ignored but not its gate/up: "All MoE projections need ..."
    one = moe(packed=set(ATTN + EXPERTS[:2] + EXPERTS[3:]),
              dense={EXPERTS[2], f"{L}.mlp.gate", "lm_head"})
    with pytest.raises(Refusal, match="All MoE projections"):
        built_quantized("vllm", "compressed-tensors", ct([EXPERTS[2]]), one)


def test_dense_expert_layer_needs_container_and_sglang_names():
    """Mixtral names experts w1/w2/w3; SGLang still asks for `.0.gate_proj`, ModelOpt
    consumers and TensorRT-LLM for the MoE module's own name."""
    c = f"{L}.block_sparse_moe.experts"
    exp = {f"{c}.{e}.w{i}" for e in range(2) for i in (1, 2, 3)}
    lay = Layout(packed=set(ATTN), dense=exp | {f"{L}.block_sparse_moe.gate", "lm_head"},
                 lm_head={"lm_head"}, model_type="mixtral")
    ig = engines.ignore_list(lay)
    assert {c, f"{c}.0.w1", f"{c}.0.gate_proj", f"{c}.0.down_proj"} <= set(ig)
    for engine in ("vllm", "sglang"):
        for dialect, qc in (("compressed-tensors", ct(ig)), ("modelopt", mo(ig))):
            assert built_quantized(engine, dialect, qc, lay)[c] is False, (engine, dialect)
    assert built_quantized("tensorrt-llm", "modelopt", mo(ig), lay)[c] is False
    # per-expert names alone: vLLM compressed-tensors is satisfied, the others are not
    only = sorted(exp | {f"{L}.block_sparse_moe.gate", "lm_head"})
    assert built_quantized("vllm", "compressed-tensors", ct(only), lay)[c] is False
    assert built_quantized("sglang", "compressed-tensors", ct(only), lay)[c] is True
    assert built_quantized("vllm", "modelopt", mo(only), lay)[c] is True


def test_quantized_lm_head_needs_its_name_in_targets():
    lay = moe(packed=set(ATTN + EXPERTS) | {"lm_head"}, dense={f"{L}.mlp.gate"})
    ig = engines.ignore_list(lay)
    assert engines.targets(lay) == ["lm_head", "Linear"]
    for engine in ("vllm", "sglang"):
        assert status(engine, "compressed-tensors", ct(ig, ["lm_head", "Linear"]),
                      lay).status == LOADS
        v = status(engine, "compressed-tensors", ct(ig), lay)  # "Linear" only: the old config
        assert v.status == FAILS and "lm_head is stored packed" in v.why
    assert status("tensorrt-llm", "modelopt", mo(ig), lay).status == FAILS
    lay.model_type = "mixtral"  # SGLang builds Mixtral's lm_head without the config
    assert status("sglang", "modelopt", mo(ig), lay).status == FAILS


def test_sglang_has_no_dense_mxfp4_and_mla_tails_reach_every_layer():
    lay = moe()
    ig = engines.ignore_list(lay)
    mx = dict(ct(ig), format="mxfp4-pack-quantized")
    assert status("sglang", "compressed-tensors", mx, lay, "mxfp4").status == FAILS
    assert status("vllm", "compressed-tensors", mx, lay, "mxfp4").status == LOADS
    # SGLang ModelOpt: an excluded kv_b_proj tail excludes kv_b_proj in every layer
    mla = Layout(packed={"model.layers.1.self_attn.kv_b_proj", "model.layers.1.self_attn.o_proj"},
                 dense={"model.layers.0.self_attn.kv_b_proj"}, model_type="llama")
    ex = ["model.layers.0.self_attn.kv_b_proj"]
    assert built_quantized("vllm", "modelopt", mo(ex), mla)["model.layers.1.self_attn.kv_b_proj"]
    assert not built_quantized("sglang", "modelopt", mo(ex),
                               mla)["model.layers.1.self_attn.kv_b_proj"]


def test_native_and_unservable_formats():
    lay = moe()
    for engine in ("vllm", "sglang", "tensorrt-llm"):
        assert status(engine, "native", {}, lay).status == FAILS
    assert status("transformers", "native", {}, lay).status == NOTE
    ue = engines.verdicts("compressed-tensors", get_format("nvfp4-ue5m3"), ct([]), lay, False)
    assert {v.status for v in ue} == {FAILS}


def test_w4a4_without_activation_scales_fails():
    lay = moe(input_scaled=set(ATTN))
    v = engines.verdicts("modelopt", get_format("nvfp4"),
                         dict(mo(engines.ignore_list(lay)), quant_algo="NVFP4"), lay, True)
    assert all(x.status == FAILS and "activation scale" in x.why for x in v
               if x.engine != "transformers")
