"""`mxptq eval` of a W4A4 checkpoint emulates the NVFP4 input quantization it declares, bit for
bit as compressed-tensors' own forward does it, and so scores differently from its W4A16 twin."""

import json

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4
from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp
from quant_helpers import quantize
from real_assets import english_text, tiny_llama_dir
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from mxptq import dequantize
from mxptq.checkpoint import read_checkpoint
from mxptq.cli import app
from mxptq.evaluate import perplexity
from mxptq.runtime.activations import fake_quantize_nvfp4_input, round_e2m1

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = ["--ctx", "64", "--max-seqs", "3", "--json"]
CT_ARGS = preset_name_to_scheme("NVFP4", ["Linear"]).input_activations


def ct_fake_quant(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' forward_quantize for a dynamic-local NVFP4 input."""
    scale, zp = compute_dynamic_scales_and_zp(x, CT_ARGS, None, global_scale=g.reshape(1))
    return fake_quantize(x, scale, zp, CT_ARGS, global_scale=g.reshape(1))


def test_e2m1_rounding_matches_compressed_tensors_ties_included():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    y = torch.cat([ties, -ties, torch.rand(20000, generator=torch.Generator().manual_seed(0))
                   * 12 - 6, torch.tensor([0.0, 6.0, -6.0])])
    assert torch.equal(round_e2m1(y), cast_to_fp4(y.clone()))


@pytest.mark.parametrize("clip", [1.0, 0.5])
def test_input_fake_quant_is_compressed_tensors_bit_for_bit(clip):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 3, 64, generator=g) * torch.rand(9, 3, 64, generator=g) ** 4 * 30
    x[0, 0, :16] = 0  # a zero block: scale 0 becomes the E4M3 epsilon
    x[1, 0, :16] = 1e-30  # a block whose scale underflows E4M3
    gs = torch.tensor(2688.0 / (float(x.abs().max()) * clip))  # clip < 1: values saturate
    assert torch.equal(fake_quantize_nvfp4_input(x, gs), ct_fake_quant(x, gs))


def evaluate(out):
    args = ["eval", "--model", str(tiny_llama_dir()), "--quantized", str(out), "--data",
            str(english_text()), *ARGS]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), res.stderr


def test_w4a4_scores_as_served_not_as_its_w4a16_twin(tmp_path):
    calib = ["--calib", str(english_text()), "--calib-samples", "4", "--calib-seqlen", "64"]
    w16, ct, mo = tmp_path / "w16", tmp_path / "ct", tmp_path / "mo"
    quantize(tiny_llama_dir(), w16, "--scale", "absmax")
    quantize(tiny_llama_dir(), ct, "--scale", "absmax", "--scheme", "w4a4", *calib)
    quantize(tiny_llama_dir(), mo, "--scale", "absmax", "--scheme", "w4a4", *calib,
             "--dialect", "modelopt")
    a, b = read_checkpoint(w16), read_checkpoint(ct)
    assert a.keys() == b.keys() and all(torch.equal(a[k].codes, b[k].codes) for k in a)
    r16, _ = evaluate(w16)
    r4, err = evaluate(ct)
    rmo, _ = evaluate(mo)
    assert r16["activations"] is None and "W4A4" not in "".join(r16["results"])
    assert "emulating W4A4 activations of" in err and r4["activations"]
    p16 = r16["results"]["quantized"]["perplexity"]["value"]
    p4 = r4["results"]["quantized (W4A4 activations)"]["perplexity"]["value"]
    assert p4 != p16  # the twin's score would mean the activation scales were dropped
    pmo = rmo["results"]["quantized (W4A4 activations)"]["perplexity"]["value"]
    assert pmo == pytest.approx(p4, rel=1e-4)  # ModelOpt stores 1/g: the same quantization
    # independently: dequantized weights, compressed-tensors' own input fake-quant, g from disk
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir(), dtype=torch.float32).eval()
    tensors = load_file(ct / "model.safetensors")
    with torch.no_grad():
        for name, qt in b.items():
            mod = dense.get_submodule(name)
            mod.weight.copy_(dequantize(qt))
            g = tensors[f"{name}.input_global_scale"]
            mod.register_forward_pre_hook(lambda m, args, g=g: (ct_fake_quant(args[0], g),))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir())
    want = perplexity(dense, tok, english_text(), mode="docs", ctx=64, max_sequences=3)
    assert p4 == pytest.approx(want.value, rel=1e-5)


def test_packed_moe_experts_quantize_each_experts_input_with_its_own_scale(tmp_path):
    from tiny_models import calibration_text, make

    from mxptq.runtime import load
    from mxptq.runtime.activations import attach_input_quant, read_input_quant
    from mxptq.runtime.experts import PackedExperts

    src, out = make(tmp_path / "moe", "qwen3_moe"), tmp_path / "q"
    quantize(src, out, "--scale", "absmax", "--scheme", "w4a4", "--calib",
             str(calibration_text(tmp_path / "c.txt")), "--calib-samples", "4",
             "--calib-seqlen", "32")
    model = load(out, dtype=torch.float32).eval()
    iq = read_input_quant(out)
    assert attach_input_quant(model, iq) == len(iq.scales)
    name = "model.layers.1.mlp.experts"
    pe = model.get_submodule(name)
    assert isinstance(pe, PackedExperts)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g) * 2
    idx = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2], [3, 0], [1, 2]])
    w = torch.rand(6, 2, generator=g)
    with torch.no_grad():
        got = pe(x, idx, w)
    want = torch.zeros_like(x)
    for t in range(6):
        for j, e in enumerate(idx[t].tolist()):
            p = f"{name}.{e}"
            gu = torch.maximum(iq.scales[f"{p}.gate_proj"], iq.scales[f"{p}.up_proj"])
            xe = ct_fake_quant(x[t : t + 1], gu)
            gate = xe @ dequantize(pe.expert(e, "gate")).T
            up = xe @ dequantize(pe.expert(e, "up")).T
            h = ct_fake_quant(pe.act_fn(gate) * up, iq.scales[f"{p}.down_proj"])
            want[t] += w[t, j] * (h @ dequantize(pe.expert(e, "down")).T)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_calibration_fake_quant_is_the_served_quantization():
    """What the calibration benchmark attaches from an amax equals what eval applies from the
    stored g = 2688/amax."""
    from mxptq.calibration import fake_quantize_activation
    from mxptq.scales import global_encode_scale

    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 256, generator=g) * torch.rand(64, 256, generator=g) ** 3 * 10
    amax = float(x.abs().max()) * 0.9
    gs = global_encode_scale(torch.tensor(amax), 448.0)
    assert torch.equal(fake_quantize_activation(x, amax), fake_quantize_nvfp4_input(x, gs))


@pytest.mark.parametrize("dialect", ["compressed-tensors", "modelopt"])
def test_load_of_w4a4_ignores_its_activation_scales_or_emulates_them(tmp_path, dialect):
    """mxptq.load: no UNEXPECTED keys for the activation scales, a warning that activations are
    not quantized, and with emulate_activations=True the served input quantization."""
    from mxptq.runtime import load

    calib = ["--calib", str(english_text()), "--calib-samples", "4", "--calib-seqlen", "64"]
    w16, w4 = tmp_path / "w16", tmp_path / "w4"
    quantize(tiny_llama_dir(), w16, "--scale", "absmax", "--dialect", dialect)
    quantize(tiny_llama_dir(), w4, "--scale", "absmax", "--scheme", "w4a4", *calib,
             "--dialect", dialect)
    ids = torch.tensor([[1, 403, 407, 261, 378, 280, 400, 290]])
    with pytest.warns(UserWarning, match="declares W4A4 activations"):
        plain, info = load(w4, dtype=torch.float32, output_loading_info=True)
    assert not info["unexpected_keys"], sorted(info["unexpected_keys"])[:3]
    assert getattr(plain, "mxptq_input_quant", None) is None
    twin = load(w16, dtype=torch.float32)
    emu = load(w4, dtype=torch.float32, emulate_activations=True)
    assert len(emu.mxptq_input_quant.scales) == 30
    with torch.no_grad():
        a, b, c = (m.eval()(ids).logits for m in (plain, twin, emu))
    assert torch.equal(a, b)  # the same weight bytes, activations left alone
    assert not torch.allclose(a, c)  # emulated inputs change the result
