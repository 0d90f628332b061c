"""Layer-by-layer calibration equals a plain full-model forward, handles MoE experts, and in
sequential mode feeds each layer the outputs of the quantized layers before it."""

import pytest
import torch
from real_assets import english_text, tiny_llama_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

from mxptq.calibration import CalibOptions, calibrate, load_calibration, quantize_layer

MODEL = tiny_llama_dir()
CALIB = english_text()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ids():
    tok = AutoTokenizer.from_pretrained(MODEL)
    return load_calibration(CALIB, tok, 6, 96, seed=0)


def load():
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def full_forward_stats(model, ids):
    """E[x²], amax and token count of every Linear input from one plain forward with hooks."""
    sums, hs = {}, []
    for name, mod in model.model.named_modules():
        if isinstance(mod, torch.nn.Linear):

            def hook(m, args, name=f"model.{name}"):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = ((x * x).sum(0), x.abs().max().item(), x.shape[0])

            hs.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hs:
        h.remove()
    return {k: ((s / n).float(), a, n) for k, (s, a, n) in sums.items()}


@pytest.mark.parametrize("lazy", [True, False])
def test_runner_stats_equal_full_forward_stats(ids, lazy):
    ref = full_forward_stats(load(), ids)
    res = calibrate(MODEL if lazy else load(), ids, batch_size=4, hessian=True)
    assert res.lazy == lazy
    assert set(res.stats) == set(ref) and len(ref) == 35 and res.empty == []
    for name, (m2, amax, n) in ref.items():
        s = res.stats[name]
        assert s.tokens == n == ids.numel()
        torch.testing.assert_close(s.second_moment(), m2, rtol=1e-5, atol=1e-7)
        assert s.amax == pytest.approx(amax, rel=1e-6)
        h = s.hessian()
        torch.testing.assert_close(h.diagonal() / 2, m2, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(h, h.T)


def test_sequential_mode_feeds_quantized_outputs_forward(ids):
    plain = calibrate(load(), ids, batch_size=6)
    model = load()
    opts = CalibOptions(scale="absmax")
    seq = calibrate(model, ids, batch_size=6, on_layer=lambda r: quantize_layer(r, opts))
    q = "model.layers.{}.self_attn.q_proj"
    torch.testing.assert_close(seq.stats[q.format(0)].second_moment(),
                               plain.stats[q.format(0)].second_moment())
    for i in range(1, 5):
        a, b = seq.stats[q.format(i)].second_moment(), plain.stats[q.format(i)].second_moment()
        assert not torch.allclose(a, b, rtol=1e-4)
    # the callback replaced weights by FP4 values: q_proj now sits on the quantized grid
    w = model.model.layers[2].self_attn.q_proj.weight
    assert w.unique().numel() < 0.5 * w.numel()
    # and down_proj (K = 172, not a multiple of 16) stayed dense
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight,
                       load().model.layers[2].mlp.down_proj.weight)


def test_non_sequential_mode_keeps_original_inputs(ids):
    plain = calibrate(load(), ids, batch_size=6)
    opts = CalibOptions(scale="absmax")
    res = calibrate(load(), ids, batch_size=6, sequential=False,
                    on_layer=lambda r: quantize_layer(r, opts))
    for name, s in plain.stats.items():
        torch.testing.assert_close(res.stats[name].second_moment(), s.second_moment())


def test_moe_experts_see_exactly_their_routed_tokens(tmp_path):
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=16, num_experts_per_tok=2, max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 6))
    # independent reference: route every token by hand from the experts' call arguments
    seen = {}
    for i, layer in enumerate(model.model.layers):

        def grab(m, args, i=i):
            seen[i] = (args[0].reshape(-1, 32), args[1])

        layer.mlp.experts.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(ids, use_cache=False)
    res = calibrate(tmp_path, ids, batch_size=1, min_expert_tokens=0)  # raw, not topped up
    empty = []
    for i, (x, idx) in seen.items():
        ex = model.model.layers[i].mlp.experts
        for e in range(16):
            name = f"model.layers.{i}.mlp.experts.{e}"
            toks = [t for t in range(x.shape[0]) if e in idx[t].tolist()]
            assert res.stats[f"{name}.gate_proj"].tokens == len(toks)
            assert res.stats[f"{name}.down_proj"].tokens == len(toks)
            if not toks:
                empty += [f"{name}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
                continue
            xe = x[toks].double()
            gate, up = (xe @ ex.gate_up_proj[e].double().T).chunk(2, dim=-1)
            d = torch.nn.functional.silu(gate) * up
            torch.testing.assert_close(res.stats[f"{name}.up_proj"].second_moment(),
                                       (xe * xe).mean(0).float(), rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(res.stats[f"{name}.down_proj"].second_moment(),
                                       (d * d).mean(0).float(), rtol=1e-4, atol=1e-8)
    assert empty and sorted(res.empty) == sorted(empty)
