"""Hostile checkpoints and hostile paths, through `quantize` (as input), `inspect` and
`mxptq.load` (as a quantized checkpoint): each is refused with one clear line naming what is
wrong (inspect: one line per problem), never a traceback, a randomly initialised layer or a
file from outside the model folder; and the input is never modified."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from reliability_helpers import cli, digest, one_error, siblings, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mxptq
from mxptq.checkpoint.safetensors_io import INDEX_NAME, ShardWriter, read_header
from mxptq.errors import MxptqError
from mxptq.outdir import STATE_NAME, partial_dir

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
FIGURES = {"quantize": 0, "inspect": 0, "load": 0}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("hostile") / "src", shard=None)


@pytest.fixture
def model(src, tmp_path) -> Path:
    """A writable single-shard copy of the input model."""
    return Path(shutil.copytree(src, tmp_path / "model"))


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile-q") / "q"
    code, err, _ = cli("quantize", "--model", src, "--out", out, "--scale", "absmax")
    assert code == 0, err
    return out


def _tensors(folder: Path, shard: str = "model.safetensors") -> dict:
    with safe_open(str(folder / shard), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _save(folder: Path, tensors: dict, shard: str = "model.safetensors") -> None:
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    index = folder / INDEX_NAME
    if index.is_file():
        idx = json.loads(index.read_text())
        idx["weight_map"] = {k: shard for k in sorted(tensors)}
        index.write_text(json.dumps(idx))


def _edit(fn):
    """A mutation that rewrites the tensors of the single shard."""
    def apply(folder: Path) -> None:
        t = _tensors(folder)
        fn(t)
        _save(folder, t)
    return apply


def _set(name: str, value: float):
    return _edit(lambda t: t.__setitem__(name, torch.full_like(t[name], value)))


def _drop(*prefixes: str):
    return _edit(lambda t: [t.pop(k) for k in list(t) if k.startswith(prefixes)])


def _poke_scale(byte: int):
    def apply(t):
        s = t[f"{Q}.weight_scale"].view(torch.uint8).clone()
        s.view(-1)[3] = byte
        t[f"{Q}.weight_scale"] = s.view(torch.float8_e4m3fn)
    return _edit(apply)


def _config(fn):
    def apply(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        fn(cfg["quantization_config"])
        (folder / "config.json").write_text(json.dumps(cfg))
    return apply




def _outside_index(folder: Path) -> None:
    """All index entries name ../outside/model.safetensors (a copy of the real shard)."""
    other = folder.parent / "outside"
    other.mkdir()
    shutil.move(folder / "model.safetensors", other / "model.safetensors")
    idx = json.loads((folder / INDEX_NAME).read_text())
    idx["weight_map"] = {k: "../outside/model.safetensors" for k in idx["weight_map"]}
    (folder / INDEX_NAME).write_text(json.dumps(idx))


def _linked_shard(folder: Path) -> None:
    other = folder.parent / "elsewhere"
    other.mkdir()
    shutil.move(folder / "model.safetensors", other / "model.safetensors")
    (folder / "model.safetensors").symlink_to(other / "model.safetensors")


def _list_weight_map(folder: Path) -> None:
    idx = json.loads((folder / INDEX_NAME).read_text())
    idx["weight_map"] = list(idx["weight_map"].items())
    (folder / INDEX_NAME).write_text(json.dumps(idx))


def _rewrite_header(fn):
    """Edit the JSON header in place (same data bytes)."""
    def apply(folder: Path) -> None:
        p = folder / "model.safetensors"
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        fn(header)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        p.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    return apply


def _overlap(h):
    names = [k for k in h if k != "__metadata__"]
    a, b = names[0], names[1]
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    h[b]["shape"], h[b]["dtype"] = h[a]["shape"], h[a]["dtype"]


def _all_at_zero(h):
    for k, e in h.items():
        if k != "__metadata__":
            e["data_offsets"] = [0, e["data_offsets"][1] - e["data_offsets"][0]]


def _truncate(folder: Path) -> None:
    p = folder / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-7])


def _dense_nan(folder: Path) -> None:
    t = _tensors(folder)
    t["model.embed_tokens.weight"][3, 5] = float("nan")
    _save(folder, t)


def _set_entry(key, value):
    def fn(h):
        name = next(k for k in h if k != "__metadata__")
        h[name][key] = value
    return fn


# (id, mutation of a quantized checkpoint, what inspect and the loader must name)
CHECKPOINT_CASES = [
    ("global-zero", _set(f"{Q}.weight_global_scale", 0.0), "global scale 0.0"),
    ("global-inf", _set(f"{Q}.weight_global_scale", math.inf), "global scale inf"),
    ("global-negative", _set(f"{Q}.weight_global_scale", -3.0), "global scale -3.0"),
    ("global-nan", _set(f"{Q}.weight_global_scale", math.nan), "global scale nan"),
    ("global-missing", _drop(f"{Q}.weight_global_scale"), f"{Q}.weight_global_scale is missing"),
    ("scale-nan-byte", _poke_scale(0x7F), "NaN scale bytes"),
    ("scale-negative-byte", _poke_scale(0xB8), "negative scale bytes"),
    ("scales-missing", _drop(f"{Q}.weight_scale"), f"{Q}.weight_scale is missing"),
    ("codes-missing", _drop(f"{Q}.weight_packed"), f"{Q}.weight_packed is missing"),
    ("fused-partner-removed", _drop(f"{K}."), f"fused partner {K}"),
    ("config-top-format", _config(lambda q: q.update(format="mxfp4-pack-quantized")),
     "format 'mxfp4-pack-quantized' but group group_0"),
    ("config-group-size", _config(lambda q: q["config_groups"]["group_0"]["weights"].update(
        group_size=32)), "group_size is 32"),
    ("config-num-bits", _config(lambda q: q["config_groups"]["group_0"]["weights"].update(
        num_bits=8)), "num_bits is 8"),
    ("index-outside", _outside_index, "points outside the checkpoint folder"),
    ("shard-link-outside", _linked_shard, "outside the checkpoint folder"),
    ("weight-map-list", _list_weight_map, "weight_map is not a map"),
    ("header-overlap", _rewrite_header(_overlap), "overlap another tensor"),
    ("header-all-at-zero", _rewrite_header(_all_at_zero), "overlap another tensor"),
    ("header-fractional-shape", _rewrite_header(_set_entry("shape", [2.5, 4])),
     "not a list of non-negative integers"),
    ("header-negative-dim", _rewrite_header(_set_entry("shape", [-1, 4])),
     "not a list of non-negative integers"),
    ("header-metadata-type", _rewrite_header(lambda h: h.update(__metadata__={"a": 1})),
     "__metadata__ is not a map"),
    ("truncated", _truncate, "the file has"),
    ("dense-nan", _dense_nan, "NaN values in a tensor stored dense"),
]


@pytest.mark.parametrize("case, mutate, needle", CHECKPOINT_CASES,
                         ids=[c[0] for c in CHECKPOINT_CASES])
def test_hostile_checkpoint_inspect_and_load(clean, tmp_path, case, mutate, needle):
    ckpt = Path(shutil.copytree(clean, tmp_path / "ckpt"))
    mutate(ckpt)
    code, err, _ = cli("inspect", ckpt)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and lines and all(ln.startswith("error: ") for ln in lines), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert any(needle in ln for ln in lines), (needle, err)
    FIGURES["inspect"] += 1
    if case == "dense-nan":
        return  # the loader checks what it packs; dense tensors load as transformers reads them
    with pytest.raises(MxptqError) as e:
        mxptq.load(ckpt)
    assert "\n" not in str(e.value)
    FIGURES["load"] += 1


def test_clean_checkpoint_passes_inspect_verify_and_load(clean):
    code, err, out = cli("inspect", clean, "--verify")
    assert code == 0, err
    model = mxptq.load(clean)
    assert sum(type(m).__name__ == "PackedLinear" for m in model.modules()) == 14


@pytest.mark.parametrize("mutate, needle", [
    (_set(f"{Q}.weight_global_scale", 0.0), "global scale 0.0"),
    (_drop(f"{K}."), f"fused partner {K}"),
])
def test_from_pretrained_of_a_native_checkpoint_validates_too(src, tmp_path, mutate, needle):
    """transformers' own from_pretrained reaches the same checks through our quantizer."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "native"
    code, err, _ = cli("quantize", "--model", src, "--out", out, "--scale", "absmax",
                       "--dialect", "native")
    assert code == 0, err
    mutate(out)
    with pytest.raises(MxptqError, match=needle):
        AutoModelForCausalLM.from_pretrained(out)


def test_verify_names_the_first_changed_tensor(clean, tmp_path):
    ckpt = Path(shutil.copytree(clean, tmp_path / "ckpt"))
    info = read_header(ckpt / "model.safetensors")[f"{K}.weight_packed"]
    with open(ckpt / "model.safetensors", "r+b") as f:  # a flipped bit no header check sees
        f.seek(info.offset + 9)
        b = f.read(1)
        f.seek(info.offset + 9)
        f.write(bytes([b[0] ^ 0x10]))
    code, err, _ = cli("inspect", ckpt)
    assert code == 0, err  # structurally fine ...
    code, err, _ = cli("inspect", ckpt, "--verify")
    assert code == 1 and f"model.safetensors: tensor {K}.weight_packed differs" in err, err
    (ckpt / "tokenizer.json").write_text("{}")
    code, err, _ = cli("inspect", ckpt, "--verify")
    assert "tokenizer.json differs from the manifest" in err, err


# --- quantize: hostile input -------------------------------------------------------------

def _run(model: Path, out: Path, *args):
    return cli("quantize", "--model", model, "--out", out, "--scale", "absmax", *args)


INPUT_CASES = [
    ("index-outside", _outside_index, "points outside the checkpoint folder"),
    ("shard-link-outside", _linked_shard, "outside the checkpoint folder"),
    ("weight-map-list", _list_weight_map, "weight_map is not a map"),
    ("header-overlap", _rewrite_header(_overlap), "overlap another tensor"),
    ("header-all-at-zero", _rewrite_header(_all_at_zero), "overlap another tensor"),
    ("header-fractional-shape", _rewrite_header(_set_entry("shape", [2.5, 4])),
     "not a list of non-negative integers"),
    ("header-negative-dim", _rewrite_header(_set_entry("shape", [-1, 4])),
     "not a list of non-negative integers"),
    ("header-metadata-type", _rewrite_header(lambda h: h.update(__metadata__=[1])),
     "__metadata__ is not a map"),
    ("header-unknown-dtype", _rewrite_header(_set_entry("dtype", "F31")), "unknown dtype"),
    ("truncated", _truncate, "the file has"),
    ("dense-nan", _dense_nan, "model.embed_tokens.weight (kept dense"),
    ("linear-missing", _drop(f"{K}.weight"), "holds no weight for (e.g. " + K),
]


@pytest.mark.parametrize("case, mutate, needle", INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_hostile_input_to_quantize(model, tmp_path, case, mutate, needle):
    if case in ("index-outside", "weight-map-list"):
        idx = {"metadata": {}, "weight_map": {k: "model.safetensors"
                                              for k in read_header(model / "model.safetensors")}}
        (model / INDEX_NAME).write_text(json.dumps(idx))
    mutate(model)
    before = digest(model.parent)
    out = tmp_path / "o"
    code, err, _ = _run(model, out)
    one_error(code, err, needle)
    assert not out.exists() and siblings(out) == []
    assert digest(model.parent) == before
    FIGURES["quantize"] += 1


def test_out_containing_the_input_is_refused_even_with_overwrite(tmp_path, src):
    d = tmp_path / "d"
    model = Path(shutil.copytree(src, d / "model"))
    before = digest(d)
    for out, args in ((d, ["--overwrite"]), (d, []), (model, ["--overwrite"]),
                      (model / "sub", []), (model / "sub", ["--overwrite"])):
        code, err, _ = _run(model, out, *args)
        one_error(code, err, "--out")
        assert digest(d) == before
    link = tmp_path / "link"
    link.symlink_to(d)  # the same folder under another name
    code, err, _ = _run(model, link, "--overwrite")
    one_error(code, err, "contains the input folder")
    assert digest(d) == before
    FIGURES["quantize"] += 6


def test_side_files_linked_outside_or_looping_are_not_copied(model, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (model / "notes.txt").symlink_to(secret)
    (model / "loop1").symlink_to(model / "loop2")
    (model / "loop2").symlink_to(model / "loop1")
    (model / "dangling.json").symlink_to(tmp_path / "gone.json")
    (model / "tok.json").symlink_to(model / "tokenizer.json")  # inside: copied
    before = digest(model)
    out = tmp_path / "o"
    code, err, stdout = _run(model, out)
    assert code == 0, err
    said = " ".join(stdout.split())
    for name in ("notes.txt", "loop1", "loop2", "dangling.json"):
        assert not (out / name).exists(), name
        assert f"note: {name}" in said, name
    assert (out / "tok.json").read_text() == (model / "tokenizer.json").read_text()
    assert digest(model) == before
    FIGURES["quantize"] += 4


def test_bad_ignore_regex_and_recipe_types(model, tmp_path):
    code, err, _ = _run(model, tmp_path / "o", "--ignore", "re:[")
    one_error(code, err, "--ignore 're:['", "not a regular expression")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("ignore: {a: 1}\n")
    code, err, _ = _run(model, tmp_path / "o", "--recipe", recipe)
    one_error(code, err, "--ignore: expected a list")
    for text, needle in (('calib-batch: "x"\n', "calib-batch must be an integer"),
                         ("damp: true\n", "damp must be a number"),
                         ("act-order: 1\n", "act-order must be true or false")):
        recipe.write_text(text)
        code, err, _ = _run(model, tmp_path / "o", "--recipe", recipe)
        one_error(code, err, needle)
    FIGURES["quantize"] += 5


def test_huge_weight_keeps_the_report_strict_json(model, tmp_path):
    t = _tensors(model)
    t[f"{Q}.weight"][1, 2] = 3e38
    _save(model, t)
    out = tmp_path / "o"
    code, err, _ = _run(model, out)
    assert code == 0, err

    def refuse(name):
        raise ValueError(f"bare {name} in the report")

    rep = json.loads((out / "mxptq_report.json").read_text(), parse_constant=refuse)
    assert all(math.isfinite(x["rel_mse"]) for x in rep["tensors"])
    assert cli("inspect", out)[0] == 0


def test_damaged_state_and_shards_on_resume(model, tmp_path, monkeypatch):
    out = tmp_path / "o"
    many = tmp_path / "many"
    tiny_llama(many, shard="60KB")
    ref = tmp_path / "ref"
    assert _run(many, ref)[0] == 0
    monkeypatch.setenv("MXPTQ_TEST_KILL_AT", "shard-recorded#3@raise")
    assert _run(many, out)[0] == 2
    monkeypatch.delenv("MXPTQ_TEST_KILL_AT")
    part = partial_dir(out)
    # a truncated finished shard is found by its hash and redone
    shard = part / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])
    code, err, stdout = _run(many, out, "--resume")
    assert code == 0, err
    assert "failed its check" in " ".join(stdout.split())
    assert (out / shard.name).read_bytes() == (ref / shard.name).read_bytes()
    # a damaged state file: one line naming it and how to start over
    out2 = tmp_path / "o2"
    monkeypatch.setenv("MXPTQ_TEST_KILL_AT", "shard-recorded#1@raise")
    assert _run(many, out2)[0] == 2
    monkeypatch.delenv("MXPTQ_TEST_KILL_AT")
    (partial_dir(out2) / STATE_NAME).write_text('{"sha256": "0", "body": {}}')
    one_error(*_run(many, out2, "--resume")[:2], "state file", "damaged", "--overwrite")
    assert _run(many, out2, "--overwrite")[0] == 0
    # input changed between the crash and the resume: refused
    out3 = tmp_path / "o3"
    monkeypatch.setenv("MXPTQ_TEST_KILL_AT", "shard-recorded#1@raise")
    assert _run(many, out3)[0] == 2
    monkeypatch.delenv("MXPTQ_TEST_KILL_AT")
    p = many / "model-00003-of-00004.safetensors"
    sd = load_file(p)
    first = next(iter(sd))
    sd[first] = sd[first] * 2  # same header, other values
    save_file(sd, str(p), metadata={"format": "pt"})
    os.utime(p)
    one_error(*_run(many, out3, "--resume")[:2], "other flags or input")
    FIGURES["quantize"] += 3


def test_shard_writer_close_then_abort_is_harmless(tmp_path):
    w = ShardWriter(tmp_path / "a.safetensors", {"x": ("F32", (2,))})
    w.put("x", torch.ones(2))
    rec = w.close()
    w.abort()
    w.abort()
    assert (tmp_path / "a.safetensors").stat().st_size == rec["size"]
    w = ShardWriter(tmp_path / "b.safetensors", {"x": ("F32", (2,))})
    with pytest.raises(RuntimeError, match="never written"):
        w.close()
    w.abort()
    assert not list(tmp_path.glob("b.*"))


def test_zz_figures():
    print(json.dumps(FIGURES))


@pytest.fixture(scope="module")
def slow_src(tmp_path_factory) -> Path:
    """A model whose exhaustive quantization lasts well beyond the test's delays (about 20 s on
    a 2-core machine), so the signal cannot arrive after the run has ended."""
    return tiny_llama(tmp_path_factory.mktemp("hostile-slow") / "src", layers=4, hidden=512,
                      shard=None)


@pytest.mark.parametrize("delay", [0.3, 1.5])
def test_ctrl_c_during_start_up_is_one_line(slow_src, tmp_path, delay):
    """`python -m mxptq` (the console script's entry): a Ctrl-C while torch and transformers
    import, or while the run starts, prints one line and exits 130."""
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "mxptq", "quantize", "--model", str(slow_src),
                          "--out", str(tmp_path / "o"), "--scale", "exhaustive"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    one_error(p.returncode, err, "interrupted (Ctrl-C)", exit_code=130)


def test_ctrl_c_after_the_run_is_one_line(tmp_path):
    """A Ctrl-C that lands after the command finished writing (while it prints its summary or
    exits) still prints its one line and exits 130: none may reach typer, which would turn the
    KeyboardInterrupt into a silent exit 130."""
    import subprocess
    import sys

    script = (
        "import os, signal, time\n"
        "from mxptq import interrupts\n"
        "from mxptq.quantize_cmd import guarded\n"
        "interrupts.start_up()\n"
        "guarded(lambda: interrupts.writing())\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
    one_error(p.returncode, p.stderr, "interrupted (Ctrl-C)", exit_code=130)
