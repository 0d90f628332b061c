"""`--calib generate[:N]`: the model writes its own calibration windows. The sampler draws from
the model's distribution, does not depend on batching, repeats for a seed, and restarts
documents with BOS; the command records and resumes generated windows (no text anywhere)."""

import json
import math

import pytest
import torch
from tiny_llama import tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

import mxptq.calibration.generate as G
from mxptq.calibration import generate_windows
from mxptq.calibration.state import STOP_ENV
from mxptq.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


class Bigram(nn.Module):
    """A stand-in causal LM: next-token logits depend on the last token only, through a
    fixed table; it takes the KV cache argument and ignores it."""

    def __init__(self, table: torch.Tensor, bos: int | None = 0, eos: int | None = 1):
        super().__init__()
        v = table.shape[0]
        self.config = LlamaConfig(vocab_size=v, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, bos_token_id=bos, eos_token_id=eos)
        self.head = nn.Linear(8, v, bias=False)
        self.table = table

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, use_cache=True, cache=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("model") / "tiny")


def test_windows_repeat_for_a_seed_and_do_not_depend_on_batching(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    a = generate_windows(model, 5, 24, seed=3)
    assert a.shape == (5, 24) and a.dtype == torch.long
    assert (a[:, 0] == 1).all()  # BOS
    assert torch.equal(a, generate_windows(model, 5, 24, seed=3, batch_rows=2))
    assert torch.equal(a[2:4], generate_windows(model, 5, 24, seed=3, batch_rows=1)[2:4])
    b = generate_windows(model, 5, 24, seed=4)
    assert not torch.equal(a[:, 1:], b[:, 1:])
    assert len({tuple(r) for r in a[:, 1:].tolist()}) == 5  # windows differ from each other


def test_sampler_draws_the_model_distribution():
    """Gumbel-max with hashed noise: token frequencies over 20,000 windows match softmax of
    the logits within 4 standard deviations (deterministic: the noise is a fixed function)."""
    p = torch.tensor([0.0, 0.0, 0.5, 0.25, 0.15, 0.07, 0.03])  # no BOS/EOS after the start
    logits = torch.where(p > 0, p.log(), torch.tensor(-math.inf))
    model = Bigram(logits.expand(7, 7).clone(), bos=0, eos=1)
    n = 20000
    ids = generate_windows(model, n, 2, seed=11, batch_rows=5000)
    freq = torch.bincount(ids[:, 1], minlength=7).double() / n
    sd = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p).abs() <= 4 * sd + 1e-12).all(), freq


def test_after_eos_comes_bos():
    table = torch.full((6, 6), -math.inf)
    table[:, 2:] = 0.0  # any content token
    table[:, 1] = math.log(0.5)  # EOS often
    model = Bigram(table, bos=0, eos=1)
    ids = generate_windows(model, 50, 40, seed=0)
    after_eos = ids[:, 1:][ids[:, :-1] == 1]
    assert len(after_eos) > 100 and (after_eos == 0).all()
    assert (ids[:, 1:][ids[:, :-1] != 1] != 0).all()  # BOS only there


def test_no_bos_starts_from_eos_and_neither_is_refused():
    table = torch.zeros(4, 4)
    assert (generate_windows(Bigram(table, bos=None, eos=3), 2, 3)[:, 0] == 3).all()
    with pytest.raises(Exception, match="no BOS or EOS"):
        generate_windows(Bigram(table, bos=None, eos=None), 2, 3)


def test_noise_is_a_function_of_its_counters():
    rows = torch.tensor([0, 7, 7])
    g = G.gumbel_noise(5, rows, 3, 1000)
    assert torch.equal(g[1], g[2]) and not torch.equal(g[0], g[1])
    assert torch.equal(g[1:2], G.gumbel_noise(5, torch.tensor([7]), 3, 1000))
    assert not torch.equal(g, G.gumbel_noise(5, rows, 4, 1000))
    assert not torch.equal(g, G.gumbel_noise(6, rows, 3, 1000))
    assert torch.isfinite(g).all()


def invoke(model, out, *args):
    return CliRunner().invoke(app, ["quantize", "--model", str(model), "--out", str(out),
                                    *map(str, args)])


@pytest.mark.slow
def test_cli_generate_records_resumes_and_repeats(tiny, tmp_path, monkeypatch):
    args = ["--calib", "generate:3", "--calib-seqlen", "32", "--algo", "gptq"]
    r = invoke(tiny, tmp_path / "a", *args)
    assert r.exit_code == 0, r.output + r.stderr
    cal = json.loads((tmp_path / "a" / "mxptq_report.json").read_text())["calibration"]
    assert cal["source"] == "generate" and cal["windows"] == [3, 32] and cal["gptq"] == 28
    assert invoke(tiny, tmp_path / "s1", *args, "--seed", "1").exit_code == 0
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a != (tmp_path / "s1" / "model.safetensors").read_bytes()

    out = tmp_path / "b"
    monkeypatch.setenv(STOP_ENV, "1")
    r = invoke(tiny, out, *args)
    assert r.exit_code == 2 and "--resume" in r.stderr, r.stderr

    def no_generation(*a, **k):
        raise AssertionError("a resumed run generated its windows again")

    monkeypatch.delenv(STOP_ENV)
    monkeypatch.setattr("mxptq.calibration.generate_windows", no_generation)
    r = invoke(tiny, out, *args, "--resume")
    assert r.exit_code == 0, r.output + r.stderr
    assert (out / "model.safetensors").read_bytes() == a


@pytest.mark.parametrize("spec", ["generate:", "generate:x", "generate:0"])
def test_bad_generate_spec_is_one_error_line(tiny, tmp_path, spec):
    r = invoke(tiny, tmp_path / "o", "--calib", spec, "--importance", "diag")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
