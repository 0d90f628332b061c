"""Calibration beyond decoder-only dense models: BERT-style encoders (layers under
`encoder.layer`, fed with an attention mask), models whose layer stack cannot be found (refused
before any output), and MoE experts the router starves (topped up from their siblings)."""

import json

import pytest
import torch
from quant_helpers import minilm_dir
from safetensors.torch import load_file
from tiny_models import calibration_text, make
from transformers import AutoModel, AutoTokenizer
from typer.testing import CliRunner

from mxptq.calibration import LinearStats
from mxptq.calibration.experts import pool_starved_experts
from mxptq.cli import app
from mxptq.inspect import inspect_checkpoint
from mxptq.runtime import load

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(model, out, *args):
    return CliRunner().invoke(app, ["quantize", "--model", str(model), "--out", str(out),
                                    *map(str, args)])


def calib(tmp_path, samples=4, seqlen=32):
    text = calibration_text(tmp_path / "calib.txt")
    return ["--calib", text, "--calib-samples", samples, "--calib-seqlen", seqlen]


def embeddings(model, inputs) -> torch.Tensor:
    """Mean-pooled, normalized sentence embeddings (what sentence-transformers computes)."""
    with torch.no_grad():
        h = model(**inputs).last_hidden_state.float()
    m = inputs["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_tiny_encoder_calibrates_end_to_end_from_the_cli(tmp_path):
    src = make(tmp_path / "bert", "bert")
    out = tmp_path / "q"
    r = cli(src, out, *calib(tmp_path), "--algo", "gptq", "--importance", "diag",
            "--scale", "absmax")
    assert r.exit_code == 0, r.output
    c = json.loads((out / "mxptq_report.json").read_text())["calibration"]
    # every Linear of the 2 encoder layers gets GPTQ; the pooler is outside the layers
    assert c["gptq"] == 12 and c["linears"] == 12 and c["empty"] == []
    assert not inspect_checkpoint(out).problems
    ids = torch.randint(1, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # a padded sentence
    inputs = {"input_ids": ids, "attention_mask": mask}
    ref = embeddings(AutoModel.from_pretrained(src, dtype=torch.float32).eval(), inputs)
    packed = embeddings(load(out, dtype=torch.float32).eval(), inputs)
    assert float((ref * packed).sum(-1).min()) > 0.99
    dense = AutoModel.from_pretrained(out, dtype=torch.bfloat16).eval()  # compressed-tensors
    torch.testing.assert_close(embeddings(dense, inputs), packed, rtol=0, atol=2e-2)


def test_minilm_sentence_embeddings_stay_close(tmp_path):
    out = tmp_path / "q"
    r = cli(minilm_dir(), out, *calib(tmp_path, 4, 64), "--importance", "diag", "--scale", "absmax")
    assert r.exit_code == 0, r.output
    c = json.loads((out / "mxptq_report.json").read_text())["calibration"]
    assert c["linears"] == 36 and c["empty"] == []  # 6 layers x 6 Linears, all calibrated
    tok = AutoTokenizer.from_pretrained(out)
    inputs = dict(tok(["A cat sat on the mat.", "Quantized weights keep the meaning.",
                       "The weather is lovely in the park today."],
                      padding=True, return_tensors="pt"))
    ref = embeddings(AutoModel.from_pretrained(minilm_dir(), dtype=torch.float32).eval(), inputs)
    got = embeddings(load(out, dtype=torch.float32).eval(), inputs)
    assert float((ref * got).sum(-1).min()) > 0.97


def test_windows_of_an_encoder_are_framed_by_cls_and_sep(tmp_path):
    from mxptq.quantize_calib import _text_windows
    from mxptq.source import resolve_model

    class P:
        model_dir = resolve_model(str(minilm_dir()))

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    ids = _text_windows(P, str(calibration_text(tmp_path / "c.txt")), tok, 3, 16, 0)
    assert ids.shape == (3, 16)
    assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()
    assert not torch.isin(ids[:, 1:-1], torch.tensor([tok.cls_token_id, tok.sep_token_id])).any()


def test_a_model_whose_layers_cannot_be_found_is_refused_before_any_output(tmp_path):
    src = make(tmp_path / "t5", "t5")  # encoder-decoder: two stacks, neither named as known
    out = tmp_path / "q"
    r = cli(src, out, *calib(tmp_path), "--importance", "diag")
    assert r.exit_code == 2
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "T5ForConditionalGeneration" in errors[0]
    assert "internal error" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "t5"]


def test_calib_generate_is_refused_for_an_encoder_before_any_output(tmp_path):
    src = make(tmp_path / "bert", "bert")
    r = cli(src, tmp_path / "q", "--calib", "generate:2", "--calib-seqlen", "8",
            "--importance", "diag")
    assert r.exit_code == 2
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "causal LM" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]


def _stats(tokens: list[float], k: int = 4) -> LinearStats:
    s = LinearStats(k, True)
    if tokens:
        s.add(torch.tensor(tokens, dtype=torch.float32).reshape(-1, k))
    return s


def test_starved_experts_are_topped_up_with_token_weighted_pooled_statistics():
    g = torch.Generator().manual_seed(0)
    rich = torch.randn(10, 4, generator=g) * 3  # 10 tokens: at least K = 4, kept as it is
    few = torch.randn(1, 4, generator=g)
    stats = {"m.experts.0.up_proj": _stats(rich.flatten().tolist()),
             "m.experts.1.up_proj": _stats(few.flatten().tolist()),
             "m.experts.2.up_proj": _stats([]),
             "m.other.down_proj": _stats([])}
    for e in range(3):  # gate and up of an expert share one input, hence one LinearStats
        stats[f"m.experts.{e}.gate_proj"] = stats[f"m.experts.{e}.up_proj"]
    shared = stats["m.experts.1.up_proj"]
    rich_sq = stats["m.experts.0.up_proj"].sq_sum.clone()
    done = pool_starved_experts(stats)
    assert sorted(done) == ["m.experts.1.gate_proj", "m.experts.1.up_proj",
                            "m.experts.2.gate_proj", "m.experts.2.up_proj"]
    assert stats["m.experts.0.up_proj"].borrowed == 0
    assert torch.equal(stats["m.experts.0.up_proj"].sq_sum, rich_sq)
    assert stats["m.other.down_proj"].tokens == 0  # not an expert: left alone
    pool = torch.cat([rich, few]).double()
    pool_sq, pool_xtx, n = (pool * pool).sum(0), pool.float().T @ pool.float(), 11
    # an expert with no token: exactly the pooled mean, counted as K tokens
    e2 = stats["m.experts.2.up_proj"]
    assert (e2.tokens, e2.borrowed, e2.own_tokens) == (4, 4, 0)
    torch.testing.assert_close(e2.second_moment(), (pool_sq / n).float())
    torch.testing.assert_close(e2.hessian(), 2 * pool_xtx / n)
    # one token: its own plus 3 tokens' worth of the pool
    w = 3 / n
    assert (shared.tokens, shared.borrowed) == (4, 3)
    torch.testing.assert_close(shared.second_moment(),
                               ((few.double() ** 2).sum(0) + w * pool_sq).float() / 4)
    assert shared.amax == e2.amax == float(pool.abs().max())
    assert pool_starved_experts({"m.experts.0.x": _stats([])}) == []  # nothing to pool
    s = _stats([1.0, 2.0, 3.0, 4.0])
    assert pool_starved_experts({"m.experts.0.x": s, "m.experts.1.x": _stats([])}, 0) == []


def starved_moe(tmp_path):
    """A tiny Qwen3-MoE whose router never selects experts 2 and 3: channel 0 of every token
    embedding is large and positive, and the router reads only that channel with weights
    2, 1, -1, -2, so top-2 is always experts 0 and 1."""
    src = make(tmp_path / "moe", "qwen3_moe")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 20.0
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[:, 0] = torch.tensor([2.0, 1.0, -1.0, -2.0])
    model.save_pretrained(src)
    return src


def test_starved_moe_experts_use_the_pooled_fallback_deterministically(tmp_path):
    src = starved_moe(tmp_path)
    args = [*calib(tmp_path), "--algo", "gptq", "--importance", "diag", "--scale", "absmax"]
    outs = [tmp_path / "q1", tmp_path / "q2"]
    for out in outs:
        r = cli(src, out, *args)
        assert r.exit_code == 0, r.output
    c = json.loads((outs[0] / "mxptq_report.json").read_text())["calibration"]
    starved = sorted(f"model.layers.{i}.mlp.experts.{e}.{p}" for i in (0, 1) for e in (2, 3)
                     for p in ("gate_proj", "up_proj", "down_proj"))
    assert c["empty"] == starved and c["pooled"] == starved
    assert c["gptq"] == 32  # every Linear, the starved experts included, by GPTQ
    assert any("topped up" in n for n in c["notes"])
    assert not inspect_checkpoint(outs[0]).problems
    a, b = (load_file(o / "model.safetensors") for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = load(outs[0], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.randint(1, 96, (1, 16)), use_cache=False).logits
    assert torch.isfinite(logits).all()
