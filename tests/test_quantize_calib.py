"""`mxptq quantize` with calibration: importance weighting, GPTQ, W4A4 input scales, flag
checks, determinism and resume (the tiny Llama, 8 windows of 64 tokens of English text, CPU)."""

import json

import pytest
import torch
from quant_helpers import dense_state, tiny_llama_dir
from real_assets import english_text
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from mxptq.calibration import CalibOptions, calibrate, load_calibration, quantize_layer
from mxptq.checkpoint import read_checkpoint
from mxptq.checkpoint.durable import KILL_ENV
from mxptq.cli import app
from mxptq.evaluate import perplexity
from mxptq.scales import global_encode_scale
from mxptq.tensor import dequantize

TEXT = english_text()
CALIB = ["--calib", str(TEXT), "--calib-samples", "8", "--calib-seqlen", "64"]
QKV = ("q_proj", "k_proj", "v_proj")


def invoke(out, *args):
    return CliRunner().invoke(app, ["quantize", "--model", str(tiny_llama_dir()), "--out", str(out),
                                    *map(str, args)])


def quantize(out, *args):
    r = invoke(out, *args)
    assert r.exit_code == 0, r.output + r.stderr
    return out


@pytest.fixture(scope="module")
def ids():
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir())
    return load_calibration(TEXT, tok, 8, 64, 0)


@pytest.fixture(scope="module")
def stats(ids):
    return calibrate(tiny_llama_dir(), ids).stats


def weighted_error(qdir, stats) -> dict[str, float]:
    """Σ_k E[x_k²] (w − ŵ)² per quantized Linear, against the original weights."""
    orig = AutoModelForCausalLM.from_pretrained(tiny_llama_dir(), dtype=torch.float32).state_dict()
    return {m: float((stats[m].second_moment() * (orig[f"{m}.weight"] - dequantize(qt)) ** 2)
                     .sum()) for m, qt in read_checkpoint(qdir).items()}


@pytest.mark.parametrize("args", [
    ["--importance", "diag"],
    ["--algo", "gptq"],
    ["--scheme", "w4a4"],
    CALIB,
    [*CALIB, "--scheme", "w4a4", "--dialect", "native"],
    [*CALIB, "--scheme", "w4a4", "--format", "mxfp4"],
    [*CALIB, "--algo", "bogus"],
    [*CALIB, "--importance", "diag", "--damp", "0"],
])
def test_bad_flag_combinations_fail_in_one_line(tmp_path, args):
    r = invoke(tmp_path / "o", *args)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (tmp_path / "o").exists()


def test_importance_lowers_the_weighted_error(tmp_path, stats):
    plain = quantize(tmp_path / "plain")
    imp = quantize(tmp_path / "imp", *CALIB, "--importance", "diag")
    assert (plain / "model.safetensors").read_bytes() != (imp / "model.safetensors").read_bytes()
    ep, ei = weighted_error(plain, stats), weighted_error(imp, stats)
    assert all(ei[m] <= ep[m] * (1 + 1e-6) for m in ep)  # per block the optimum of its metric
    assert sum(ei.values()) < sum(ep.values())
    rep = json.loads((imp / "mxptq_report.json").read_text())
    assert rep["flags"]["importance"] == "diag" and rep["flags"]["calib-samples"] == 8
    assert rep["calibration"]["tokens"] == 8 * 64 and rep["calibration"]["empty"] == []


def test_same_seed_same_bytes(tmp_path):
    a = quantize(tmp_path / "a", *CALIB, "--importance", "diag")
    b = quantize(tmp_path / "b", *CALIB, "--importance", "diag")
    c = quantize(tmp_path / "c", *CALIB, "--importance", "diag", "--seed", "1")
    data = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert data[0] == data[1] != data[2]


def test_gptq_writes_the_library_result(tmp_path, ids):
    out = quantize(tmp_path / "g", *CALIB, "--algo", "gptq", "--importance", "diag")
    opts = CalibOptions(format="nvfp4", scale="search", importance=True, algo="gptq")
    lib = {}
    calibrate(tiny_llama_dir(), ids, hessian=True, keep_stats=False,
              on_layer=lambda run: lib.update(quantize_layer(run, opts)))
    got = read_checkpoint(out)
    assert sorted(got) == sorted(lib) and len(got) == 30
    for m, qt in lib.items():
        assert torch.equal(got[m].codes, qt.codes), m
        assert torch.equal(got[m].scales.view(torch.uint8), qt.scales.view(torch.uint8)), m
        assert torch.equal(got[m].global_scale, qt.global_scale), m


@pytest.mark.shared
def test_gptq_beats_rtn_on_a_trained_model(tmp_path, shared_assets):
    """stories260K calibrated on TinyStories text: GPTQ's perplexity on held-out stories is
    lower than plain abs-max rounding's (a random model has no perplexity to protect)."""
    model = shared_assets / "models" / "stories260K"
    text = shared_assets / "text" / "tinystories"
    calib = ["--calib", text / "validation_prefix.txt", "--calib-samples", "8",
             "--calib-seqlen", "64"]
    outs = {}
    for name, args in (("g", [*calib, "--algo", "gptq", "--importance", "diag"]),
                       ("r", ["--scale", "absmax"])):
        r = CliRunner().invoke(app, ["quantize", "--model", str(model), "--out",
                                     str(tmp_path / name), *map(str, args)])
        assert r.exit_code == 0, r.output + r.stderr
        outs[name] = tmp_path / name
    tok = AutoTokenizer.from_pretrained(model)
    docs = (text / "validation_100.txt").read_text().split("<|endoftext|>")[:10]
    ten = tmp_path / "ten.txt"
    ten.write_text("<|endoftext|>".join(docs))
    models = {k: AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
              for k, d in outs.items()}  # compressed-tensors decompresses to bf16 on CPU
    ppl = {k: perplexity(m, tok, ten).value for k, m in models.items()}
    assert ppl["g"] < ppl["r"]


def _set_max(stats, parent: str, leaves) -> float:
    return max(stats[f"{parent}.{leaf}"].amax for leaf in leaves)


def test_w4a4_compressed_tensors_shares_input_scales_and_loads(tmp_path, stats):
    out = quantize(tmp_path / "w", *CALIB, "--scheme", "w4a4")
    sd = load_file(out / "model.safetensors")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    acts = cfg["config_groups"]["group_0"]["input_activations"]
    assert acts["dynamic"] == "local" and acts["observer"] == "static_minmax"
    assert acts["strategy"] == "tensor_group" and acts["group_size"] == 16
    for i in range(5):
        for parent, leaves in ((f"model.layers.{i}.self_attn", QKV),
                               (f"model.layers.{i}.mlp", ("gate_proj", "up_proj")),
                               (f"model.layers.{i}.self_attn", ("o_proj",))):
            want = global_encode_scale(torch.tensor(_set_max(stats, parent, leaves)), 448)
            for leaf in leaves:
                t = sd[f"{parent}.{leaf}.input_global_scale"]
                assert t.dtype == torch.float32 and t.shape == (1,)
                assert torch.equal(t, want.reshape(1)), f"{parent}.{leaf}"
        assert f"model.layers.{i}.mlp.down_proj.input_global_scale" not in sd  # stays dense

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():  # compressed-tensors decompresses on the first forward
        logits = loaded(torch.tensor([[1, 403, 407, 261, 378, 280, 400, 290]])).logits
    assert torch.isfinite(logits).all()
    lsd = loaded.state_dict()
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir(), dtype=torch.bfloat16)
    for k, v in dense_state(ref, out).items():
        assert torch.equal(lsd[k], v), k
    for k, v in sd.items():
        if k.endswith("input_global_scale"):
            assert torch.equal(lsd[k].float().reshape(1), v), k


def test_w4a4_modelopt_input_scale(tmp_path, stats):
    out = quantize(tmp_path / "m", *CALIB, "--scheme", "w4a4", "--dialect", "modelopt")
    sd = load_file(out / "model.safetensors")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    hf = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert cfg["quant_algo"] == hf["quant_algo"] == "NVFP4"
    assert cfg["config_groups"]["group_0"]["input_activations"]["num_bits"] == 4
    t = sd["model.layers.2.self_attn.k_proj.input_scale"]
    assert t.dtype == torch.float32 and t.shape == ()
    amax = _set_max(stats, "model.layers.2.self_attn", QKV)
    assert float(t) == pytest.approx(amax / 2688, rel=1e-6)
    assert torch.equal(t, sd["model.layers.2.self_attn.q_proj.input_scale"])
    assert len(read_checkpoint(out)) == 30


def test_resume_refuses_other_calibration_flags(tmp_path, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setenv(KILL_ENV, "shard-recorded#1@raise")
    assert invoke(out, *CALIB, "--importance", "diag").exit_code != 0
    monkeypatch.delenv(KILL_ENV)
    r = invoke(out, *CALIB, "--importance", "diag", "--seed", "3", "--resume")
    assert r.exit_code == 2 and "other flags" in r.stderr


def test_resume_refuses_changed_calibration_text(tmp_path, monkeypatch):
    """Same --calib path, other contents: the calibration (and so the bytes) would differ."""
    text = tmp_path / "calib.txt"
    text.write_text(TEXT.read_text())
    args = ["--calib", text, "--calib-samples", "8", "--calib-seqlen", "64",
            "--importance", "diag"]
    out = tmp_path / "o"
    monkeypatch.setenv(KILL_ENV, "shard-recorded#1@raise")
    assert invoke(out, *args).exit_code != 0
    monkeypatch.delenv(KILL_ENV)
    text.write_text(text.read_text()[::-1])
    r = invoke(out, *args, "--resume")
    assert r.exit_code == 2 and "other flags" in r.stderr


def _tiny_moe(root):
    """A tiny random Qwen3-MoE with the tiny Llama's tokenizer, saved the hub way (per-expert 2-D
    tensors) and the transformers-5 way (fused 3-D gate_up_proj / down_proj)."""
    import shutil

    import transformers as T
    from safetensors.torch import save_file

    cfg = T.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = T.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 3 * torch.rand_like(p) ** 8)
    two_d, fused = root / "moe-2d", root / "moe-3d"
    model.save_pretrained(two_d)
    fused.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(two_d / "config.json", fused / "config.json")
    for folder in (two_d, fused):
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_llama_dir() / f, folder / f)
    return two_d, fused


def test_gptq_covers_moe_experts_in_both_checkpoint_layouts(tmp_path):
    """Every expert that saw tokens gets GPTQ bytes (not RTN), and a checkpoint storing fused
    3-D experts gets the same bytes as the per-expert one of the same model."""
    two_d, fused = _tiny_moe(tmp_path)
    args = ["--format", "nvfp4", "--scale", "search", *CALIB, "--algo", "gptq"]

    def run(src, out, *extra):
        r = CliRunner().invoke(app, ["quantize", "--model", str(src), "--out", str(out),
                                     *args, *extra])
        assert r.exit_code == 0, r.output + r.stderr
        return read_checkpoint(out), json.loads((out / "mxptq_report.json").read_text())

    q2, rep = run(two_d, tmp_path / "q2")
    q3, _ = run(fused, tmp_path / "q3")
    cal = rep["calibration"]
    experts = [m for m in q2 if ".experts." in m]
    assert len(experts) == 2 * 4 * 3 and set(q3) == set(q2)
    assert not [n for n in cal["notes"] if "instead of GPTQ" in n], cal["notes"]
    for m in q2:
        assert torch.equal(q2[m].codes, q3[m].codes), m
        assert torch.equal(q2[m].scale_codes(), q3[m].scale_codes()), m
    rtn = CliRunner().invoke(app, ["quantize", "--model", str(two_d), "--out",
                                   str(tmp_path / "rtn"), "--format", "nvfp4", "--scale",
                                   "search"])
    assert rtn.exit_code == 0
    qr = read_checkpoint(tmp_path / "rtn")
    routed = [m for m in experts if m not in cal["empty"]]
    assert routed and all(not torch.equal(q2[m].codes, qr[m].codes) for m in routed)
    for m in experts:  # gate and up of an expert share one global scale
        if m.endswith("up_proj"):
            gate = q2[m.replace("up_proj", "gate_proj")]
            assert torch.equal(q2[m].global_scale, gate.global_scale)


def test_mixtral_expert_names_get_their_statistics(tmp_path):
    """Mixtral checkpoints name experts `block_sparse_moe.experts.E.w1/w3/w2`; transformers 5
    fuses them into `mlp.experts`, where the statistics are collected. Each checkpoint tensor
    must still get its expert's importance and GPTQ bytes (not the RTN fallback)."""
    import shutil

    import transformers as T

    cfg = T.MixtralConfig(
        hidden_size=64, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    src = tmp_path / "mixtral"
    T.MixtralForCausalLM(cfg).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir() / f, src / f)

    def run(out, *extra):
        r = CliRunner().invoke(app, ["quantize", "--model", str(src), "--out", str(out),
                                     "--format", "nvfp4", *extra])
        assert r.exit_code == 0, r.output + r.stderr
        return read_checkpoint(out), json.loads((out / "mxptq_report.json").read_text())

    q, rep = run(tmp_path / "gptq", *CALIB, "--algo", "gptq", "--importance", "diag")
    qr, _ = run(tmp_path / "rtn")
    experts = [m for m in q if ".block_sparse_moe.experts." in m]
    assert len(experts) == 2 * 4 * 3
    assert rep["calibration"]["notes"] == [], rep["calibration"]["notes"]
    routed = [m for m in experts if m not in rep["calibration"]["empty"]]
    assert routed and all(not torch.equal(q[m].codes, qr[m].codes) for m in routed)
    for m in experts:
        if m.endswith(".w3"):
            assert torch.equal(q[m].global_scale, q[m[:-2] + "w1"].global_scale)
