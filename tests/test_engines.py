"""Conformance: tiny random Llama, Qwen3-MoE, Mixtral and DeepSeek-V3 (shared + routed experts,
MLA) checkpoints, in both dialects and both schemes, with and without a quantized lm_head. For
each, the modules every engine would build quantized (its loading rules, read from its source:
mxptq/checkpoint/engines.py, docs/checkpoints.md) are exactly the modules we wrote packed; fused
partners share global scales; every W4A4 layer has its activation scale; and transformers +
compressed-tensors really load the compressed-tensors ones."""

import json
import re

import pytest
import torch
from quant_helpers import dense_state, quantize
from safetensors import safe_open
from tiny_models import ARCHS, calibration_text, make
from typer.testing import CliRunner

from mxptq.checkpoint import engines, read_checkpoint
from mxptq.checkpoint.engines import FAILS, LOADS, NOTE, UNVERIFIED
from mxptq.cli import app
from mxptq.inspect import inspect_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = {"qwen3_moe", "mixtral", "deepseek_v3"}
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"),
         ("q_a_proj", "kv_a_proj_with_mqa"))
CASES = [(a, d, s, lm) for a in ARCHS for d in ("compressed-tensors", "modelopt")
         for s, lm in (("w4a16", False), ("w4a16", True), ("w4a4", False))]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    text = calibration_text(root / "calib.txt")
    return {a: make(root / a, a) for a in ARCHS}, text


def _quantize(src, out, arch, dialect, scheme, lm_head, *more):
    models, text = src
    args = ["--format", "nvfp4", "--scale", "absmax", "--dialect", dialect, *more]
    if lm_head:
        args.append("--quantize-lm-head")
    if scheme == "w4a4":
        args += ["--scheme", "w4a4", "--calib", str(text), "--calib-samples", "4",
                 "--calib-seqlen", "32"]
    quantize(models[arch], out, *args)
    return out


def _expected(arch, dialect, scheme, lm_head) -> dict[str, str]:
    """The verdict table of docs/checkpoints.md for these cases."""
    w4a4 = scheme == "w4a4"
    want = {"vllm": NOTE if w4a4 else LOADS, "sglang": NOTE if w4a4 else LOADS}
    if arch == "deepseek_v3" or (arch == "mixtral" and lm_head):
        # packed kv_b_proj: SGLang's MLA loader needs it dense; its Mixtral lm_head is dense
        want["sglang"] = FAILS
    if lm_head:
        want["tensorrt-llm"] = FAILS
    elif dialect == "modelopt":
        want["tensorrt-llm"] = NOTE if w4a4 else UNVERIFIED
    else:
        want["tensorrt-llm"] = UNVERIFIED
    if dialect == "modelopt":
        want["transformers"] = NOTE  # only through mxptq
    else:
        want["transformers"] = FAILS if arch in MOE else NOTE  # fused-experts global-scale bug
    return want


@pytest.mark.parametrize("arch,dialect,scheme,lm_head", CASES)
def test_engines_build_exactly_what_we_wrote(src, tmp_path, arch, dialect, scheme, lm_head):
    out = _quantize(src, tmp_path / "q", arch, dialect, scheme, lm_head)
    ins = inspect_checkpoint(out)
    assert not ins.problems, ins.problems
    lay = ins.layout
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if dialect == "modelopt":  # TensorRT-LLM reads hf_quant_config.json first: same list
        hf = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
        assert hf["exclude_modules"] == qc["ignore"] and hf["group_size"] == qc["group_size"]
    want = _expected(arch, dialect, scheme, lm_head)
    for engine in [e for e in engines.ENGINES if (e, dialect) in engines._RULES]:
        built = engines.built_quantized(engine, dialect, qc, lay)
        stored = engines.stored_quantized(lay, per_module=engine == "transformers")
        if lm_head and (engine == "tensorrt-llm" or (engine, arch) == ("sglang", "mixtral")):
            # TensorRT-LLM (and SGLang's Mixtral) build lm_head without a quantization
            # config whatever the config says: that is the verdict's reason
            assert built.pop("lm_head") is False and stored.pop("lm_head") is True
        assert built == stored, engine
    assert {v.engine: v.status for v in ins.engines} == want, ins.engines

    # what was written: routers dense and named; lm_head targeted when packed
    assert ("lm_head" in lay.packed) == lm_head
    routers = {m for m in lay.dense if m.rpartition(".")[2] == "gate"}
    assert (arch in MOE) == bool(routers) and routers <= set(qc["ignore"])
    if dialect == "compressed-tensors":
        assert qc["config_groups"]["group_0"]["targets"] == (
            ["lm_head", "Linear"] if lm_head else ["Linear"])
    assert {c for c in lay.containers()} == (
        {f"model.layers.{i}.{'block_sparse_moe' if arch == 'mixtral' else 'mlp'}.experts"
         for i in ({1} if arch == "deepseek_v3" else {0, 1})} if arch in MOE else set())

    # fused partners share one global scale (and one activation scale under W4A4)
    q = read_checkpoint(out)
    tensors = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    act = "input_global_scale" if dialect == "compressed-tensors" else "input_scale"
    shared = 0
    for mod in q:
        parent, _, leaf = mod.rpartition(".")
        for fs in FUSED:
            if leaf in fs and leaf != fs[0] and f"{parent}.{fs[0]}" in q:
                first = f"{parent}.{fs[0]}"
                assert torch.equal(q[mod].global_scale, q[first].global_scale), mod
                if scheme == "w4a4":
                    assert torch.equal(tensors[f"{mod}.{act}"], tensors[f"{first}.{act}"]), mod
                shared += 1
    assert shared >= 2 * 3
    if scheme == "w4a4":
        assert lay.input_scaled == lay.packed
        for mod in q:
            t = tensors[f"{mod}.{act}"]
            assert t.dtype == torch.float32 and torch.isfinite(t).all() and (t > 0).all(), mod


def test_w4a4_with_quantized_lm_head_is_refused_in_one_line(src, tmp_path):
    models, text = src
    r = CliRunner().invoke(app, [
        "quantize", "--model", str(models["llama"]), "--out", str(tmp_path / "o"),
        "--quantize-lm-head", "--scheme", "w4a4", "--calib", str(text),
        "--calib-samples", "2", "--calib-seqlen", "32"])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "lm_head" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_transformers_loads_what_the_rules_say(src, tmp_path, arch):
    """compressed-tensors in transformers: every weight equals our dequantize of the bytes.
    MXFP4 for the MoE model (NVFP4 experts hit transformers' global-scale bug, see verdicts)."""
    from transformers import AutoModelForCausalLM

    models, _ = src
    fmt = "mxfp4" if arch in MOE else "nvfp4"
    out = tmp_path / "q"
    quantize(models[arch], out, "--format", fmt, "--scale", "absmax", "--quantize-lm-head")
    assert {v.engine: v.status for v in inspect_checkpoint(out).engines}["transformers"] == NOTE
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ref = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.bfloat16).eval()
    ref.load_state_dict(dense_state(ref, out))
    ids = torch.tensor([[5, 17, 33, 64, 2, 90, 41, 8]])
    with torch.no_grad():
        a, b = loaded(ids).logits, ref(ids).logits
    lsd = loaded.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(lsd[k], v), k
    assert torch.equal(a, b)


def test_one_ignored_expert_keeps_its_whole_moe_layer_dense(src, tmp_path):
    out = _quantize(src, tmp_path / "q", "qwen3_moe", "compressed-tensors", "w4a16", False,
                    "--ignore", "model.layers.1.mlp.experts.2.down_proj")
    rep = json.loads((out / "mxptq_report.json").read_text())
    layer1 = {k: v for k, v in rep["kept"].items() if ".layers.1.mlp.experts." in k}
    assert len(layer1) == 4 * 3
    assert layer1["model.layers.1.mlp.experts.2.down_proj.weight"] == "matches --ignore"
    why = layer1["model.layers.1.mlp.experts.0.gate_proj.weight"]
    assert why.startswith("MoE layer model.layers.1.mlp.experts kept dense: "
                          "model.layers.1.mlp.experts.2.down_proj.weight matches --ignore")
    ins = inspect_checkpoint(out)
    assert not any(".layers.1.mlp.experts." in m for m in ins.layout.packed)
    assert any(".layers.0.mlp.experts." in m for m in ins.layout.packed)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for name in ("model.layers.1.mlp.experts", "model.layers.1.mlp.experts.0.gate_proj",
                 "model.layers.1.mlp.experts.3.up_proj"):
        assert name in qc["ignore"]
    assert {v.engine: v.status for v in ins.engines}["vllm"] == LOADS


def test_unfit_expert_projection_keeps_the_layer_dense(tmp_path):
    """moe_intermediate_size 24: every down_proj has K = 24, not a multiple of 16."""
    src = make(tmp_path / "m", "mixtral", intermediate_size=24)
    out = tmp_path / "q"
    quantize(src, out, "--format", "nvfp4", "--scale", "absmax", "--dialect", "modelopt")
    ins = inspect_checkpoint(out)
    assert not any(engines.expert_of(m) for m in ins.layout.packed)
    assert "model.layers.0.self_attn.q_proj" in ins.layout.packed
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {"model.layers.0.block_sparse_moe.experts", "model.layers.0.block_sparse_moe.gate",
            "model.layers.0.block_sparse_moe.experts.0.w1",
            "model.layers.0.block_sparse_moe.experts.0.gate_proj"} <= set(qc["ignore"])
    statuses = {v.engine: v.status for v in ins.engines}
    assert statuses["vllm"] == statuses["sglang"] == LOADS


REFUSE = r"""
import sys
from transformers import AutoModelForCausalLM
for folder in sys.argv[1:]:
    try:
        AutoModelForCausalLM.from_pretrained(folder)
        print("LOADED", folder)
    except Exception as e:
        print("REFUSED", type(e).__name__, str(e).splitlines()[0][:200])
"""


@pytest.mark.slow
def test_without_mxptq_transformers_refuses_native_and_modelopt(src, tmp_path):
    """Plain transformers (mxptq never imported) must not hand back random weights."""
    import subprocess
    import sys

    models, _ = src
    nat, mo = tmp_path / "nat", tmp_path / "mo"
    quantize(models["llama"], nat, "--format", "nvfp4-ue5m3", "--dialect", "native")
    quantize(models["llama"], mo, "--format", "nvfp4", "--dialect", "modelopt")
    # cwd outside the repository: from its root, transformers' probe for the `kernels` package
    # finds this repository's kernels/ folder, which imports mxptq
    r = subprocess.run([sys.executable, "-c", REFUSE, str(nat), str(mo)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("LOADED", "REFUSED"))]
    assert len(lines) == 2, r.stdout + r.stderr[-2000:]
    assert lines[0].startswith("REFUSED ValueError") and "quant_method" in lines[0]
    assert lines[1].startswith("REFUSED RuntimeError") and "mismatched" in lines[1]
    qc = json.loads((nat / "config.json").read_text())["quantization_config"]
    assert "quant_method" not in qc and qc["mxptq_dialect"] == "native"
    # with mxptq imported (this process) both load packed
    from transformers import AutoModelForCausalLM

    from mxptq.runtime.linear import PackedLinear

    for folder in (nat, mo):
        m = AutoModelForCausalLM.from_pretrained(folder)
        assert isinstance(m.model.layers[0].self_attn.q_proj, PackedLinear)
    warnings = inspect_checkpoint(mo).warnings
    assert len(warnings) == 1 and "import mxptq" in warnings[0]


def test_shared_expert_gate_linear_stays_dense(tmp_path):
    """Qwen2-MoE's shared_expert_gate is an nn.Linear in transformers, but vLLM and SGLang build
    it with quant_config=None (vLLM models/qwen2_moe.py): the plan keeps it dense and named."""
    import transformers as T

    from mxptq.checkpoint.dialects import get_dialect
    from mxptq.formats import get_format
    from mxptq.plan import build_plan

    torch.manual_seed(0)
    cfg = T.Qwen2MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           shared_expert_intermediate_size=64, num_experts=4,
                           num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128)
    T.Qwen2MoeForCausalLM(cfg).save_pretrained(tmp_path)
    p = build_plan(tmp_path, get_format("nvfp4"), "absmax", get_dialect("compressed-tensors"))
    by = {it.name: it for it in p.items}
    for r in ("model.layers.0.mlp.shared_expert_gate", "model.layers.0.mlp.gate"):
        assert by[f"{r}.weight"].action == "keep" and "router" in by[f"{r}.weight"].reason
        assert r in p.ignore
    assert by["model.layers.0.mlp.shared_expert.gate_proj.weight"].action == "quantize"
    assert p.layout.packed >= {f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(4)}


def test_inspect_prints_the_verdicts(src, tmp_path):
    out = _quantize(src, tmp_path / "q", "qwen3_moe", "modelopt", "w4a16", True)
    r = CliRunner().invoke(app, ["inspect", str(out), "--engines"])
    assert r.exit_code == 0, r.output
    text = re.sub(r"[\s│┃]+", " ", r.stdout)  # table cells wrap at 80 columns
    assert "vLLM loads; SGLang loads; TensorRT-LLM will not load" in text
    assert "serving engines" in text and "DecoderModelForCausalLM" in text
    assert r.stderr.startswith("warning: transformers loads this modelopt checkpoint only")
    j = json.loads(CliRunner().invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert j["engines"]["vllm"] == {"status": LOADS, "why": ""}
    assert j["engines"]["tensorrt-llm"]["status"] == FAILS
