"""Perplexity by the assets README method, KL divergence, attention emulation and `mxptq eval`."""

import json
from pathlib import Path

import pytest
import torch
import typer
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from mxptq.calibration.attention import use_emulated_attention
from mxptq.eval_cmd import eval_command
from mxptq.evaluate import kl_divergence, perplexity, reference_logprobs, score, sequences

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
MODEL = ASSETS / "models" / "stories260K"
EVAL = ASSETS / "text" / "tinystories" / "validation_100.txt"
# The first 10 stories, docs mode, computed with the README's own loop (3,874 tokens).
PPL_FIRST_10 = 4.351127


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL)


def load():
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model():
    return load()


def test_sequences_follow_the_readme(tok):
    docs = sequences(tok, EVAL, "docs")
    assert len(docs) == 100 and all(s[0] == tok.bos_token_id and len(s) <= 512 for s in docs)
    assert max(len(s) for s in docs) == 512  # some stories are cut at 511 tokens
    ids = tok(EVAL.read_text(), add_special_tokens=False).input_ids
    stream = sequences(tok, EVAL, "stream", ctx=128)
    assert all(len(s) == 128 for s in stream[:-1]) and stream[0][1:] == ids[:127]
    assert sum(len(s) - 1 for s in stream) == len(ids)


def test_perplexity_full_validation_100_matches_the_readme(model, tok):
    r = perplexity(model, tok, EVAL, "docs")
    assert r.tokens == 35351 and r.sequences == 100
    assert r.value == pytest.approx(3.742, abs=0.002)


def test_perplexity_subset_and_kl(model, tok):
    r = perplexity(model, tok, EVAL, "docs", max_sequences=10)
    assert r.tokens == 3874 and r.value == pytest.approx(PPL_FIRST_10, abs=1e-4)
    assert kl_divergence(model, model, tok, EVAL, max_sequences=3).value == 0.0
    noisy = load()
    with torch.no_grad():
        noisy.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    seqs = sequences(tok, EVAL, max_sequences=3)
    ppl, kl = score(noisy, seqs, reference_logprobs(model, seqs))
    assert kl.value > 1e-3 and ppl.value != perplexity(model, tok, EVAL, max_sequences=3).value


def test_emulated_attention_perturbs_but_keeps_the_model_working(model, tok):
    emu = load()
    name = use_emulated_attention(emu, "nvfp4", "search")
    assert emu.config._attn_implementation == name
    seqs = sequences(tok, EVAL, "docs", ctx=64, max_sequences=3)
    base = score(model, seqs)[0].value
    ppl, kl = score(emu, seqs, reference_logprobs(model, seqs))
    assert 0 < kl.value < 1.0 and ppl.value != base and ppl.value < 3 * base
    with pytest.raises(ValueError, match="nvfp4 only"):
        use_emulated_attention(emu, "mxfp4")


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("eval")(eval_command)
    return app


def test_eval_command_json_and_table(model, tmp_path):
    q = load()
    with torch.no_grad():
        q.model.layers[1].self_attn.v_proj.weight.mul_(0.8)
    q.save_pretrained(tmp_path / "q")
    args = ["--model", str(MODEL), "--quantized", str(tmp_path / "q"), "--data", str(EVAL),
            "--max-seqs", "2", "--ctx", "64"]
    res = CliRunner().invoke(_app(), [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["results"]["quantized"]["kl"]["value"] > 0
    assert out["results"]["original"]["perplexity"]["tokens"] == 126
    table = CliRunner().invoke(_app(), args)
    assert table.exit_code == 0 and "KL vs original" in table.stdout
    emu = CliRunner().invoke(_app(), [*args[:2], *args[4:], "--emulate-attention", "nvfp4",
                                      "--scale", "absmax", "--json"])
    assert emu.exit_code == 0, emu.output
    assert json.loads(emu.stdout)["results"]["original + nvfp4 attention"]["kl"]["value"] > 0


def test_eval_command_unloadable_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "bad").mkdir()
    res = CliRunner().invoke(_app(), ["--model", str(MODEL), "--quantized", str(tmp_path / "bad"),
                                      "--data", str(EVAL), "--max-seqs", "1"])
    assert res.exit_code == 2
    assert "could not be loaded" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("dialect", ["compressed-tensors", "native"])
def test_eval_command_on_a_quantized_checkpoint(tmp_path, dialect):
    """A real `mxptq quantize` output: evaluated with exactly its bytes (our loader)."""
    from quant_helpers import quantize

    from mxptq import dequantize
    from mxptq.checkpoint import read_checkpoint

    out = tmp_path / "q"
    quantize(MODEL, out, "--scale", "absmax", "--dialect", dialect)
    args = ["--model", str(MODEL), "--quantized", str(out), "--data", str(EVAL),
            "--max-seqs", "2", "--ctx", "64", "--json"]
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["results"]["quantized"]
    dense = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, qt in read_checkpoint(out).items():
            dense.get_submodule(name).weight.copy_(dequantize(qt))
    tok = AutoTokenizer.from_pretrained(MODEL)
    want = perplexity(dense, tok, EVAL, mode="docs", ctx=64, max_sequences=2)
    assert got["perplexity"]["value"] == pytest.approx(want.value, rel=1e-4)
    assert got["kl"]["value"] > 0
