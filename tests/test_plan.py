"""The plan: which tensors are quantized, kept (and why), and which share a global scale."""

import json
import os
import subprocess
import sys

import pytest
import torch
from quant_helpers import minilm_dir, tiny_llama_dir

from mxptq import skeleton
from mxptq.checkpoint.dialects import get_dialect
from mxptq.errors import MxptqError
from mxptq.formats import get_format
from mxptq.plan import build_plan, matches


def plan(path, fmt="nvfp4", dialect="compressed-tensors", **kw):
    return build_plan(path, get_format(fmt, kw.pop("block", None)), "absmax",
                      get_dialect(dialect), **kw)


def test_tiny_llama_plan_keeps_down_proj_and_groups_qkv_gate_up():
    p = plan(tiny_llama_dir())
    s = p.summary()
    assert s["quantize"] == 5 * 6  # q, k, v, o, gate, up in 5 layers
    kept = {it.name: it.reason for it in p.items if it.action == "keep"}
    assert kept["model.layers.0.mlp.down_proj.weight"].startswith("input dim not a multiple")
    assert "model.embed_tokens.weight" in kept
    assert "lm_head" in p.ignore and "model.layers.3.mlp.down_proj" in p.ignore
    g = p.groups["model.layers.2.self_attn.q_proj+k_proj+v_proj"]
    assert g == [f"model.layers.2.self_attn.{x}_proj.weight" for x in "kqv"]
    assert len(p.groups) == 10


def test_ignore_pattern_keeps_whole_fused_set():
    p = plan(tiny_llama_dir(), ignore=["*.layers.1.self_attn.k_proj"])
    by = {it.name: it for it in p.items}
    for x in "qkv":
        it = by[f"model.layers.1.self_attn.{x}_proj.weight"]
        assert it.action == "keep"
    assert by["model.layers.1.self_attn.q_proj.weight"].reason.startswith("fused partner")
    assert by["model.layers.1.self_attn.o_proj.weight"].action == "quantize"
    assert "model.layers.1.self_attn.q_proj" in p.ignore


def test_matches_wildcards_and_regex():
    assert matches(["*.mlp.*"], "model.layers.0.mlp.up_proj")
    assert matches(["re:layers\\.[01]\\."], "model.layers.1.mlp.up_proj")
    assert not matches(["re:layers\\.[01]\\."], "model.layers.2.mlp.up_proj")


def test_quantize_lm_head_only_when_asked(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    by = {it.name: it for it in plan(tmp_path).items}
    assert by["lm_head.weight"].action == "keep"
    by = {it.name: it for it in plan(tmp_path, quantize_lm_head=True).items}
    assert by["lm_head.weight"].action == "quantize"


def test_minilm_plan_groups_query_key_value():
    p = plan(minilm_dir())
    assert p.summary()["quantize"] == 6 * 6 + 1  # 6 Linear per layer + pooler
    assert "encoder.layer.0.attention.self.query+key+value" in p.groups
    assert p.ignore == []


def test_fused_3d_experts_are_sliced_by_their_layout(tmp_path):
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, vocab_size=128, num_experts=4, num_experts_per_tok=2)
    m = Qwen3MoeForCausalLM(cfg)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    by = {it.name: it for it in plan(tmp_path).items}
    gu = by["model.layers.0.mlp.experts.gate_up_proj"]
    assert gu.action == "quantize" and gu.layout == "out_in" and gu.split == 2
    assert gu.modules[:2] == ["model.layers.0.mlp.experts.0.gate_proj",
                              "model.layers.0.mlp.experts.0.up_proj"]
    assert by["model.layers.0.mlp.experts.down_proj"].modules[3] == (
        "model.layers.0.mlp.experts.3.down_proj")
    assert by["model.layers.0.mlp.gate.weight"].action == "keep"  # the router


@pytest.mark.parametrize(
    "fmt,block,dialect",
    [("nvfp4-ue5m3", None, "compressed-tensors"), ("nvfp4", 8, "compressed-tensors"),
     ("mxfp4", None, "modelopt"), ("nvfp4", 32, "modelopt")],
)
def test_dialect_refuses_what_it_cannot_express(fmt, block, dialect):
    with pytest.raises(MxptqError, match=f"dialect {dialect} cannot express"):
        plan(tiny_llama_dir(), fmt, dialect, block=block)


def test_nothing_quantizable_is_refused():
    with pytest.raises(MxptqError, match="no Linear weight"):
        plan(tiny_llama_dir(), "nvfp4", "native", block=128)


def test_plan_reads_no_tensor_data(monkeypatch):
    import mxptq.checkpoint.safetensors_io as io

    def boom(*a, **k):
        raise AssertionError("tensor data read during planning")

    monkeypatch.setattr(io, "read_tensor", boom)
    monkeypatch.setattr(torch, "load", boom)
    assert plan(tiny_llama_dir()).summary()["quantize"] == 30


def test_skeleton_cache_is_used_and_survives_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("MXPTQ_CACHE_DIR", str(tmp_path / "cache"))
    built = skeleton.build_skeleton(tiny_llama_dir())
    first = skeleton.load_skeleton(tiny_llama_dir())
    assert first == built
    (entry,) = (tmp_path / "cache").glob("skeleton-*.json")

    def boom(model_dir):
        raise AssertionError("built although cached")

    monkeypatch.setattr(skeleton, "build_skeleton", boom)
    assert skeleton.load_skeleton(tiny_llama_dir()) == built  # read from the cache
    entry.write_text("{not json")
    monkeypatch.undo()
    monkeypatch.setenv("MXPTQ_CACHE_DIR", str(tmp_path / "cache"))
    assert skeleton.load_skeleton(tiny_llama_dir()) == built  # rebuilt, and the entry rewritten
    assert sorted(json.loads(entry.read_text())["linears"]) == sorted(built.linears)


def test_skeleton_cache_key_follows_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MXPTQ_CACHE_DIR", str(tmp_path / "cache"))
    other = tmp_path / "model"
    other.mkdir()
    cfg = json.loads((tiny_llama_dir() / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=2)))
    a, b = skeleton.load_skeleton(tiny_llama_dir()), skeleton.load_skeleton(other)
    assert len(list((tmp_path / "cache").glob("skeleton-*.json"))) == 2
    assert len(b.linears) < len(a.linears)
    monkeypatch.setenv("MXPTQ_NO_CACHE", "1")
    assert skeleton.cache_dir() is None and skeleton.load_skeleton(tiny_llama_dir()) == a


def test_cached_plan_does_not_import_transformers(tmp_path):
    """With the skeleton cached, planning (the CLI's start-up) never imports transformers."""
    env = dict(os.environ, MXPTQ_CACHE_DIR=str(tmp_path / "cache"))
    code = (
        "import sys\n"
        "from mxptq.checkpoint.dialects import get_dialect\n"
        "from mxptq.formats import get_format\n"
        "from mxptq.plan import build_plan\n"
        f"p = build_plan(__import__('pathlib').Path({str(tiny_llama_dir())!r}), "
        "get_format('nvfp4'), 'absmax', get_dialect('compressed-tensors'))\n"
        "print(p.summary()['quantize'], 'transformers' in sys.modules)\n"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    assert runs[0].stdout.split() == ["30", "True"]  # the first run builds the skeleton
    assert runs[1].stdout.split() == ["30", "False"]
