"""Checkpoints loaded by the real client: transformers + compressed-tensors must compute what
our own `dequantize` of the same bytes computes (compressed-tensors decompresses to bf16)."""

import pytest
import torch
from quant_helpers import dense_state, minilm_dir, quantize, tiny_llama_dir
from transformers import AutoModel, AutoModelForCausalLM

BF16 = torch.bfloat16


def _assert_same_model(loaded, ref_dir, qdir, cls, inputs, out_attr):
    ref = cls.from_pretrained(ref_dir, dtype=BF16).eval()
    ref.load_state_dict(dense_state(ref, qdir))
    with torch.no_grad():
        a = getattr(loaded(**inputs), out_attr)  # compressed-tensors decompresses here
        b = getattr(ref(**inputs), out_attr)
    lsd = loaded.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(lsd[k], v), k
    assert torch.equal(a, b)
    return ref


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_tiny_llama_loads_in_transformers(tmp_path, fmt):
    out = tmp_path / "q"
    quantize(tiny_llama_dir(), out, "--format", fmt, "--scale", "search")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=BF16).eval()
    ids = torch.tensor([[1, 403, 407, 261, 378, 280, 400, 290]])
    _assert_same_model(loaded, tiny_llama_dir(), out, AutoModelForCausalLM,
                       {"input_ids": ids}, "logits")


@pytest.mark.slow
def test_minilm_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "q"
    quantize(minilm_dir(), out, "--scale", "absmax")
    tok = AutoTokenizer.from_pretrained(out)
    inputs = dict(tok(["A cat sat on the mat.", "Quantized weights, same meaning."],
                      padding=True, return_tensors="pt"))
    loaded = AutoModel.from_pretrained(out, dtype=BF16).eval()
    pooling = minilm_dir() / "1_Pooling" / "config.json"  # sentence-transformers sub-folder
    assert (out / "1_Pooling" / "config.json").read_bytes() == pooling.read_bytes()
    _assert_same_model(loaded, minilm_dir(), out, AutoModel, inputs, "last_hidden_state")
