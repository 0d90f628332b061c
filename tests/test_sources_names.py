"""The name-based plan: when transformers cannot build the model, the plan comes from the
safetensors headers, and for architectures it does know it decides exactly what the model
class decides (byte-identical output)."""

import json

import pytest
import torch
from quant_helpers import quantize
from safetensors.torch import save_file
from source_writers import QWEN3_MOE, make_fp8_block, save_sharded, tiny
from typer.testing import CliRunner

from mxptq import skeleton
from mxptq.checkpoint.dialects import get_dialect
from mxptq.cli import app
from mxptq.formats import get_format
from mxptq.name_plan import expert_layout
from mxptq.plan import build_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def plan(path, **kw):
    return build_plan(path, get_format("nvfp4"), "search", get_dialect("compressed-tensors"),
                      **kw)


def rename_type(src, dst, model_type="mystery_lm"):
    """A copy of the checkpoint whose model_type the installed transformers does not know."""
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def fused_qwen3_moe(tmp):
    """Qwen3-MoE with transformers 5's fused 3-D expert tensors in the checkpoint
    (gate_up_proj [E, 2I, H], down_proj [E, H, I]), in 3 shards."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(1)
    cfg = Qwen3MoeConfig(**dict(QWEN3_MOE, moe_intermediate_size=48), dtype="bfloat16")
    sd = {k: v.to(torch.bfloat16).contiguous()
          for k, v in Qwen3MoeForCausalLM(cfg).state_dict().items()}
    names = sorted(sd)
    save_sharded(tmp / "fused", sd, cfg.to_dict(),
                 {k: i * 3 // len(names) for i, k in enumerate(names)})
    return tmp / "fused"


def sharded(tmp, arch):
    sd, cfg = tiny(arch, tmp)
    names = sorted(sd)
    save_sharded(tmp / arch, sd, cfg, {k: i * 4 // len(names) for i, k in enumerate(names)})
    return tmp / arch


MODELS = {
    "llama": lambda t: sharded(t, "llama"),
    "qwen3_moe": lambda t: sharded(t, "qwen3_moe"),
    "qwen3_moe_fused_3d": fused_qwen3_moe,
    "deepseek_v3_fp8": lambda t: make_fp8_block(t).src,  # Kimi-K2 style: DeepSeek-V3 in FP8
}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_unknown_model_type_gives_the_known_architecture_bytes(tmp_path, arch):
    src = MODELS[arch](tmp_path)
    unknown = rename_type(src, tmp_path / "unknown")
    known_plan, name_plan = plan(src), plan(unknown)
    assert not known_plan.name_based and name_plan.name_based
    assert "does not know model type 'mystery_lm'" in name_plan.names_reason
    assert [(i.name, i.action, i.group) for i in name_plan.items] == [
        (i.name, i.action, i.group) for i in known_plan.items]
    args = ("--scale", "4over6", "--quantize-lm-head") if arch == "llama" else ("--scale",
                                                                                 "search")
    quantize(src, tmp_path / "a", *args)
    quantize(unknown, tmp_path / "b", *args)
    a, b = tmp_path / "a", tmp_path / "b"
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) >= 3 and shards == sorted(p.name for p in b.glob("*.safetensors"))
    for n in [*shards, "model.safetensors.index.json"]:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    qa, qb = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (a, b))
    assert qa == qb
    report = json.loads((b / "mxptq_report.json").read_text())
    assert report["plan"]["planned_from"].startswith("tensor names (transformers")


def test_dry_run_shows_the_name_based_plan(tmp_path):
    unknown = rename_type(sharded(tmp_path, "qwen3_moe"), tmp_path / "unknown")
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["quantize", "--model", str(unknown), "--out", str(out),
                                 "--dry-run"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "the plan comes from tensor names" in r.stdout
    assert "model.layers.*.mlp.experts.*.gate_proj.weight" in r.stdout
    assert "keep: not a Linear weight" in r.stdout  # the router
    assert not out.exists()


def test_calibration_needs_the_model_class(tmp_path):
    unknown = rename_type(sharded(tmp_path, "llama"), tmp_path / "unknown")
    calib = tmp_path / "c.txt"
    calib.write_text("text " * 100)
    r = CliRunner().invoke(app, ["quantize", "--model", str(unknown), "--out",
                                 str(tmp_path / "o"), "--calib", str(calib),
                                 "--importance", "diag"])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: --calib needs the model class")
    assert "mystery_lm" in lines[0]


def test_fused_sets_from_a_recipe_replace_the_table(tmp_path):
    src = sharded(tmp_path, "llama")
    p = plan(src, fused_sets=[("q_proj", "k_proj")])
    assert "model.layers.0.self_attn.q_proj+k_proj" in p.groups
    assert not any("gate_proj" in g or "v_proj" in g for g in p.groups)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("fused-set:\n  - [q_proj, k_proj]\n  - gate_proj,up_proj\n")
    r = CliRunner().invoke(app, ["quantize", "--model", str(src), "--out", str(tmp_path / "o"),
                                 "--recipe", str(recipe), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["fused_groups"] == 4  # 2 layers x (q+k, gate+up)
    r = CliRunner().invoke(app, ["quantize", "--model", str(src), "--out", str(tmp_path / "o"),
                                 "--fused-set", "q_proj", "--dry-run"])
    assert r.exit_code == 2 and "two or more module leaf names" in r.stderr


def test_names_that_do_not_share_an_input_are_not_fused(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in [
        ("model.layers.0.attn.q_proj.weight", (64, 64)),
        ("model.layers.0.attn.k_proj.weight", (32, 32)),  # another input width
        ("model.layers.0.mlp.gate_proj.weight", (64, 64)),
        ("model.layers.0.mlp.up_proj.weight", (64, 64)),
        ("model.layers.0.mlp.down_proj.weight", (64, 64)),
        ("model.embed.weight", (128, 64)),
    ]}
    (tmp_path / "m").mkdir()
    save_file(t, str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "config.json").write_text(json.dumps(
        {"model_type": "mystery_lm", "architectures": ["MysteryModel"], "hidden_size": 64}))
    p = plan(tmp_path / "m")
    assert p.name_based and list(p.groups) == ["model.layers.0.mlp.gate_proj+up_proj"]
    by = {it.name: it for it in p.items}
    assert by["model.layers.0.attn.k_proj.weight"].action == "quantize"
    assert by["model.embed.weight"].action == "keep"
    assert "lm_head" not in p.ignore  # not a causal LM: no tied head


def test_expert_layout_from_shapes():
    assert expert_layout("gate_up_proj", (8, 96, 64), 64) == "out_in"
    assert expert_layout("gate_up_proj", (8, 64, 96), 64) == "in_out"  # gpt-oss
    assert expert_layout("down_proj", (8, 64, 48), 64) == "out_in"
    assert expert_layout("down_proj", (8, 48, 64), 64) == "in_out"
    assert expert_layout("down_proj", (8, 64, 64), 64) == "unknown"  # square: cannot tell
    assert expert_layout("w13", (8, 96, 64), 64) == "unknown"


def test_unknown_3d_expert_layout_is_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"model.layers.0.mlp.experts.down_proj": torch.randn(4, 64, 64, generator=g),
         "model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 128, 64, generator=g)}
    (tmp_path / "m").mkdir()
    save_file(t, str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "config.json").write_text(json.dumps(
        {"model_type": "mystery_lm", "hidden_size": 64}))
    r = CliRunner().invoke(app, ["quantize", "--model", str(tmp_path / "m"), "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "model.layers.0.mlp.experts.down_proj" in r.stderr and "--ignore" in r.stderr


def test_the_cache_remembers_what_transformers_cannot_build(tmp_path, monkeypatch):
    monkeypatch.setenv("MXPTQ_CACHE_DIR", str(tmp_path / "cache"))
    unknown = rename_type(sharded(tmp_path, "llama"), tmp_path / "unknown")
    with pytest.raises(skeleton.ModelClassUnavailable, match="mystery_lm") as first:
        skeleton.load_skeleton(unknown)

    def boom(model_dir):
        raise AssertionError("transformers asked again")

    monkeypatch.setattr(skeleton, "build_skeleton", boom)
    with pytest.raises(skeleton.ModelClassUnavailable) as second:
        skeleton.load_skeleton(unknown)
    assert str(second.value) == str(first.value)


def test_remote_code_reason(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}}))
    with pytest.raises(skeleton.ModelClassUnavailable,
                       match="model type 'kimi_k2' needs remote code"):
        skeleton.build_skeleton(tmp_path)  # and does not ask on stdin whether to run it
