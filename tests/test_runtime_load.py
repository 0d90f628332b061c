"""Loading mxptq checkpoints into PackedLinear through transformers: the loaded layers hold the
checkpoint's exact bytes and compute what a dense model of the dequantized weights computes."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import dense_state, english_documents, minilm_dir, quantize, tiny_llama_dir
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import mxptq
from mxptq.checkpoint import read_checkpoint
from mxptq.errors import MxptqError
from mxptq.runtime import (
    PackedConfig,
    PackedHfQuantizer,
    PackedLinear,
    linear_weight_bytes,
    packed_config,
)

DIALECTS = {
    "ct-nvfp4": ("--format", "nvfp4", "--scale", "search"),
    "modelopt": ("--format", "nvfp4", "--scale", "search", "--dialect", "modelopt"),
    "native-ue5m3-b8": ("--format", "nvfp4-ue5m3", "--block-size", "8", "--dialect", "native"),
    "ct-mxfp4": ("--format", "mxfp4", "--scale", "search"),
}
IDS = torch.tensor([[1, 403, 407, 261, 378, 280, 400, 290], [1, 300, 301, 302, 303, 304, 305, 2]])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    for name, args in DIALECTS.items():
        quantize(tiny_llama_dir(), root / name, *args)
    return {name: root / name for name in DIALECTS}


def _dense_ref(qdir, dtype=torch.float32) -> nn.Module:
    """The tiny Llama with every quantized weight replaced by its dequantized value."""
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir(), dtype=dtype).eval()
    ref.load_state_dict(dense_state(ref, qdir, dtype))
    return ref


def _packed(model: nn.Module) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def _perplexity(model: nn.Module, tok, docs: int = 20) -> float:
    """docs mode: [BOS] + tok(document)[:511], over the first `docs` English documents."""
    texts = english_documents(docs)
    nll = count = 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, add_special_tokens=False).input_ids[:511]
            x = torch.tensor([[tok.bos_token_id, *ids]])
            logits = model(x).logits[0, :-1].float()
            nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += x.shape[1] - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_layers_hold_the_checkpoint_bytes(ckpts, dialect):
    model = mxptq.load(ckpts[dialect])
    q = read_checkpoint(ckpts[dialect])
    packed = _packed(model)
    assert set(packed) == set(q) and q
    for name, qt in q.items():
        got = packed[name].quantized()
        assert got.format == qt.format, name
        assert torch.equal(got.codes, qt.codes), name
        assert got.scales.dtype == qt.scales.dtype, name
        assert torch.equal(got.scales.view(torch.uint8), qt.scales.view(torch.uint8)), name
        if qt.global_scale is None:
            assert got.global_scale is None, name
        else:
            assert got.global_scale.shape == () and torch.equal(got.global_scale, qt.global_scale)
    dense = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert "lm_head" in dense
    if dialect == "native-ue5m3-b8":  # K = 172 is not a multiple of 8: kept dense
        assert {f"model.layers.{i}.mlp.down_proj" for i in range(5)} <= set(dense)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_logits_perplexity_and_generation_match_dequantized_model(ckpts, dialect):
    model, ref = mxptq.load(ckpts[dialect]), _dense_ref(ckpts[dialect])
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(ckpts[dialect])
    ppl, ppl_ref = _perplexity(model, tok), _perplexity(ref, tok)
    assert abs(ppl / ppl_ref - 1) < 1e-3
    orig = AutoModelForCausalLM.from_pretrained(tiny_llama_dir()).eval()
    assert ppl < 1.2 * _perplexity(orig, tok)
    bos = torch.tensor([[tok.bos_token_id]])
    kw = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": tok.eos_token_id}
    out, out_ref = model.generate(bos, **kw), ref.generate(bos, **kw)
    assert out.shape[1] > 10 and torch.equal(out, out_ref)


@pytest.mark.parametrize("dialect", ["native-ue5m3-b8", "modelopt"])
def test_from_pretrained_after_import_uses_packed_layers(ckpts, dialect):
    q = read_checkpoint(ckpts[dialect])
    assert set(_packed(AutoModelForCausalLM.from_pretrained(ckpts[dialect]))) == set(q)
    with pytest.warns(UserWarning, match="quantization_config"):  # the checkpoint's is used
        model = AutoModelForCausalLM.from_pretrained(ckpts[dialect],
                                                     quantization_config=mxptq.PackedConfig())
    assert set(_packed(model)) == set(q)


def test_fresh_process_import_is_light_and_from_pretrained_still_finds_the_loader(ckpts):
    """`import mxptq` leaves transformers unimported (CLI start-up); importing transformers
    afterwards registers the loader before from_pretrained runs."""
    code = (
        "import sys; import mxptq\n"
        "assert 'transformers' not in sys.modules, 'import mxptq imported transformers'\n"
        "from transformers import AutoModelForCausalLM\n"
        "from mxptq.runtime import PackedLinear\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(ckpts['modelopt'])!r})\n"
        "n = sum(isinstance(x, PackedLinear) for x in m.modules())\n"
        "assert n > 0, 'no packed layer'\n"
        "print('packed', n)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) == len(read_checkpoint(ckpts["modelopt"]))


def test_checkpoint_that_matches_no_linear_is_refused(ckpts):
    class Other(nn.Module):
        base_model_prefix = "model"

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 64)

    qdir = ckpts["ct-nvfp4"]
    quantizer = PackedHfQuantizer(PackedConfig(**packed_config(qdir).quantization_config))
    with pytest.raises(MxptqError, match="none of the checkpoint's 30 quantized modules"):
        quantizer._process_model_before_weight_loading(
            Other(), checkpoint_files=[str(qdir / "model.safetensors")])


def test_compressed_tensors_loader_still_works_and_ours_is_opt_in(ckpts):
    qdir = ckpts["ct-nvfp4"]
    theirs = AutoModelForCausalLM.from_pretrained(qdir, dtype=torch.bfloat16).eval()
    assert not _packed(theirs)  # transformers + compressed-tensors: dense layers
    ours = AutoModelForCausalLM.from_pretrained(qdir, config=packed_config(qdir)).eval()
    assert set(_packed(ours)) == set(read_checkpoint(qdir))
    with torch.no_grad():
        a = theirs(IDS).logits.float()
        b = ours(IDS).logits
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())


def test_device_map_auto(ckpts):
    for dialect in ("ct-nvfp4", "native-ue5m3-b8"):
        model = mxptq.load(ckpts[dialect], device="auto")
        ref = mxptq.load(ckpts[dialect])
        assert _packed(model) and all(p.device.type == "cpu" for p in model.buffers())
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
    model = AutoModelForCausalLM.from_pretrained(ckpts["modelopt"], device_map="auto")
    assert _packed(model)


def test_dtype_keeps_packed_bytes(ckpts):
    model = mxptq.load(ckpts["ct-nvfp4"], dtype=torch.bfloat16)
    q = read_checkpoint(ckpts["ct-nvfp4"])
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.scales.dtype == torch.float8_e4m3fn and layer.global_scale.dtype == torch.float32
    assert torch.equal(layer.global_scale, q["model.layers.0.self_attn.q_proj"].global_scale)
    assert model(IDS).logits.dtype == torch.bfloat16


def test_memory_of_packed_layers_tiny_llama(ckpts):
    model = mxptq.load(ckpts["ct-nvfp4"], dtype=torch.bfloat16)
    packed = linear_weight_bytes(nn.ModuleList(_packed(model).values()))
    assert packed.ratio <= 0.3
    whole = linear_weight_bytes(model)  # down_proj (K = 172) and lm_head stay bf16
    assert packed.bytes < whole.bytes < whole.bf16_bytes
    print(f"tiny Llama nvfp4: packed layers {packed.bytes} B vs bf16 {packed.bf16_bytes} B "
          f"({packed.ratio:.3f}); all linears {whole.bytes} B vs {whole.bf16_bytes} B "
          f"({whole.ratio:.3f})")


def test_minilm_loads_packed(tmp_path):
    qdir = tmp_path / "minilm"
    quantize(minilm_dir(), qdir, "--scale", "absmax")
    model = mxptq.load(qdir).eval()
    assert type(model).__name__ == "BertModel"  # not a causal LM: AutoModel
    q = read_checkpoint(qdir)
    assert set(_packed(model)) == set(q) and len(q) >= 36  # 6 layers x 6 Linears (+ pooler)
    ref = AutoModel.from_pretrained(minilm_dir(), dtype=torch.float32).eval()
    ref.load_state_dict(dense_state(ref, qdir, torch.float32))
    tok = AutoTokenizer.from_pretrained(qdir)
    x = dict(tok(["A cat sat on the mat.", "Packed weights, same meaning."], padding=True,
                 return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(model(**x).last_hidden_state, ref(**x).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
    mem = linear_weight_bytes(model)
    assert mem.ratio <= 0.3
    print(f"MiniLM nvfp4: linear weights {mem.bytes} B vs bf16 {mem.bf16_bytes} B "
          f"({mem.ratio:.3f})")
