"""Perplexity (docs and stream modes), KL divergence, attention emulation and `mxptq eval`, on
the tiny Llama and English text; stories260K's published figures where the shared assets are."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import typer
from real_assets import english_documents, english_text, tiny_llama_dir
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from mxptq.calibration.attention import use_emulated_attention
from mxptq.eval_cmd import eval_command
from mxptq.evaluate import kl_divergence, perplexity, reference_logprobs, score, sequences

# stories260K on the first 10 TinyStories validation stories, docs mode, computed with the
# assets README's own loop (3,874 tokens).
PPL_FIRST_10 = 4.351127


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tiny_llama_dir())


def load(path=None):
    path = path or tiny_llama_dir()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model():
    return load()


def test_sequences_follow_the_docs_and_stream_rules(tok):
    text = english_text()
    docs = sequences(tok, text, "docs")
    assert len(docs) == len(english_documents())
    assert all(s[0] == tok.bos_token_id and len(s) <= 512 for s in docs)
    assert max(len(s) for s in docs) == 512  # long documents are cut at 511 tokens
    first = tok(english_documents(1)[0], add_special_tokens=False).input_ids
    assert docs[0][1:] == first[:511]
    ids = tok(text.read_text(), add_special_tokens=False).input_ids
    stream = sequences(tok, text, "stream", ctx=128)
    assert all(len(s) == 128 for s in stream[:-1]) and stream[0][1:] == ids[:127]
    assert sum(len(s) - 1 for s in stream) == len(ids)


def _readme_loop(model, tok, texts: list[str]) -> tuple[float, int]:
    """Perplexity the plain way: [BOS] + tok(text)[:511] per document, one sum of NLLs."""
    nll = count = 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, add_special_tokens=False).input_ids[:511]
            x = torch.tensor([[tok.bos_token_id, *ids]])
            nll += F.cross_entropy(model(x).logits[0, :-1], x[0, 1:], reduction="sum").item()
            count += x.shape[1] - 1
    return math.exp(nll / count), count


def test_perplexity_subset_and_kl(model, tok):
    text = english_text()
    r = perplexity(model, tok, text, "docs", max_sequences=4)
    want, tokens = _readme_loop(model, tok, english_documents(4))
    assert r.tokens == tokens and r.sequences == 4
    assert r.value == pytest.approx(want, rel=1e-5)
    assert kl_divergence(model, model, tok, text, max_sequences=3).value == 0.0
    noisy = load()
    with torch.no_grad():
        noisy.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    seqs = sequences(tok, text, max_sequences=3)
    ppl, kl = score(noisy, seqs, reference_logprobs(model, seqs))
    assert kl.value > 1e-3 and ppl.value != perplexity(model, tok, text, max_sequences=3).value


@pytest.mark.shared
def test_stories260k_perplexity_matches_the_assets_readme(shared_assets):
    """The published figures: all 100 stories (PPL 3.742 over 35,351 tokens) and the first 10."""
    path = shared_assets / "models" / "stories260K"
    text = shared_assets / "text" / "tinystories" / "validation_100.txt"
    model, tok = load(path), AutoTokenizer.from_pretrained(path)
    r = perplexity(model, tok, text, "docs")
    assert r.tokens == 35351 and r.sequences == 100
    assert r.value == pytest.approx(3.742, abs=0.002)
    r = perplexity(model, tok, text, "docs", max_sequences=10)
    assert r.tokens == 3874 and r.value == pytest.approx(PPL_FIRST_10, abs=1e-4)


def test_emulated_attention_perturbs_but_keeps_the_model_working(model, tok):
    emu = load()
    name = use_emulated_attention(emu, "nvfp4", "search")
    assert emu.config._attn_implementation == name
    seqs = sequences(tok, english_text(), "docs", ctx=64, max_sequences=3)
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
    args = ["--model", str(tiny_llama_dir()), "--quantized", str(tmp_path / "q"),
            "--data", str(english_text()),
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
    res = CliRunner().invoke(_app(), ["--model", str(tiny_llama_dir()), "--quantized",
                                      str(tmp_path / "bad"), "--data", str(english_text()),
                                      "--max-seqs", "1"])
    assert res.exit_code == 2
    assert "could not be loaded" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("dialect", ["compressed-tensors", "native"])
def test_eval_command_on_a_quantized_checkpoint(tmp_path, dialect):
    """A real `mxptq quantize` output: evaluated with exactly its bytes (our loader)."""
    from quant_helpers import quantize

    from mxptq import dequantize
    from mxptq.checkpoint import read_checkpoint

    out = tmp_path / "q"
    quantize(tiny_llama_dir(), out, "--scale", "absmax", "--dialect", dialect)
    args = ["--model", str(tiny_llama_dir()), "--quantized", str(out), "--data",
            str(english_text()), "--max-seqs", "2", "--ctx", "64", "--json"]
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["results"]["quantized"]
    dense = load()
    with torch.no_grad():
        for name, qt in read_checkpoint(out).items():
            dense.get_submodule(name).weight.copy_(dequantize(qt))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir())
    want = perplexity(dense, tok, english_text(), mode="docs", ctx=64, max_sequences=2)
    assert got["perplexity"]["value"] == pytest.approx(want.value, rel=1e-4)
    assert got["kl"]["value"] > 0


def _one_error_line(res, *words):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in res.output


@pytest.mark.parametrize("args, words", [
    (["--ctx", "0"], ["--ctx 0", "at least 2"]),
    (["--ctx", "1"], ["--ctx 1"]),
    (["--max-seqs", "0"], ["--max-seqs 0"]),
    (["--mode", "lines"], ["unknown --mode 'lines'"]),
])
def test_eval_refuses_bad_numbers_at_once(args, words):
    res = CliRunner().invoke(_app(), ["--model", str(tiny_llama_dir()), "--data",
                                      str(english_text()), *args])
    _one_error_line(res, *words)


def test_eval_missing_data_file_is_named_as_such(tmp_path):
    res = CliRunner().invoke(_app(), ["--model", str(tiny_llama_dir()), "--data",
                                      str(tmp_path / "wiki.test.raw")])
    _one_error_line(res, "--data", "wiki.test.raw", "no such file")
    assert "calibration" not in res.stderr


def test_eval_model_without_tokenizer(tmp_path):
    import shutil

    src = tmp_path / "model"
    shutil.copytree(tiny_llama_dir(), src)
    for f in src.glob("tokenizer*"):
        f.unlink()
    res = CliRunner().invoke(_app(), ["--model", str(src), "--data", str(english_text())])
    _one_error_line(res, "--model", "no tokenizer")


def test_eval_refuses_a_nan_scale_by_name(tmp_path):
    from quant_helpers import quantize

    from mxptq.checkpoint.safetensors_io import read_header

    out = tmp_path / "q"
    quantize(tiny_llama_dir(), out, "--scale", "absmax")
    name = "model.layers.1.self_attn.q_proj.weight_scale"
    info = read_header(out / "model.safetensors")[name]
    with open(out / "model.safetensors", "r+b") as f:
        f.seek(info.offset + 3)
        f.write(bytes([0x7F]))  # E4M3 NaN
    res = CliRunner().invoke(_app(), ["--model", str(tiny_llama_dir()), "--quantized", str(out),
                                      "--data", str(english_text()), "--max-seqs", "1"])
    _one_error_line(res, "--quantized", name, "NaN")


def test_auto_mode_scores_a_plain_corpus_whole_and_says_how_much(tok, tmp_path):
    plain = tmp_path / "wiki.test.raw"  # no <|endoftext|>: one corpus, as WikiText ships
    plain.write_text("\n\n".join(english_documents(3)))
    args = ["--model", str(tiny_llama_dir()), "--data", str(plain), "--ctx", "128"]
    res = CliRunner().invoke(_app(), [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    n = len(tok(plain.read_text(), add_special_tokens=False).input_ids)
    assert out["mode"] == "stream" and out["tokens"] == n > 3 * 127
    assert f"scored {n:,} tokens in {out['sequences']} sequences (stream mode, ctx 128)" in (
        res.stderr)
    docs = CliRunner().invoke(_app(), [*args, "--mode", "docs", "--json"])
    cut = json.loads(docs.stdout)
    assert cut["sequences"] == 1 and cut["tokens"] == 127 and cut["cut_tokens"] == n - 127
    assert "longer than ctx - 1 = 127 tokens" in docs.stderr
