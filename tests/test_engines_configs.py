"""Our configs read by the engines' own config code: every compressed-tensors release that
vLLM/SGLang releases pin (vLLM 0.11 -> 0.11.0, 0.12-0.13 -> 0.12.2, 0.15-0.18 -> 0.13.0,
0.20 -> 0.15.0.1, 0.23-0.34 -> 0.17.0; SGLang 0.5.20-0.5.23 -> 0.18.0), and ModelOpt's
hf_quant_config.json -> config.json converter. The wheels come from `make install`
(tests/engine_wheels.txt, `pip download --no-deps` into .whl/engines); without them these
tests skip and say so."""

import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from quant_helpers import quantize
from tiny_models import make

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl" / "engines"
PINS = [ln.split("#")[0].strip() for ln in (REPO / "tests" / "engine_wheels.txt").read_text()
        .splitlines() if ln.split("#")[0].strip()]
CT = [p.split("==")[1] for p in PINS if p.startswith("compressed-tensors==")]


def wheel(req: str) -> Path:
    name, version = req.split("==")
    path = WHEELS / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    if not path.is_file():
        pytest.skip(f"{path.name} not in {WHEELS} (fetched by `make install`; offline?)")
    return path


# One interpreter for every release: torch and transformers are imported once; between
# releases every compressed_tensors module is dropped and the next wheel is put on sys.path
# (pure-Python wheels import straight from the zip).
PARSE = r"""
import json, sys
configs = json.loads(sys.argv[1])
sys.path.insert(0, sys.argv[2])  # frozendict, imported by compressed-tensors 0.11-0.12
for wheel in sys.argv[3:]:
    for k in [k for k in sys.modules if k.split(".")[0] == "compressed_tensors"]:
        del sys.modules[k]
    sys.path.insert(0, wheel)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
    for name, qc in configs.items():
        try:
            QuantizationConfig.model_validate(qc)  # transformers' loader
            for g in qc["config_groups"].values():  # vLLM/SGLang validate each args block
                QuantizationArgs.model_validate(g["weights"])
                if g.get("input_activations"):
                    QuantizationArgs.model_validate(g["input_activations"])
            print(wheel.rsplit("/", 1)[1], name, "ok")
        except Exception as e:
            print(wheel.rsplit("/", 1)[1], name, "FAIL", type(e).__name__)
    sys.path.remove(wheel)
"""


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    src = make(root / "m", "qwen3_moe")
    out = {}
    for name, args in {"nvfp4": ("--quantize-lm-head",), "mxfp4": ("--format", "mxfp4")}.items():
        quantize(src, root / name, "--scale", "absmax", *args)
        out[name] = json.loads((root / name / "config.json").read_text())["quantization_config"]
    mo = root / "mo"
    quantize(src, mo, "--scale", "absmax", "--dialect", "modelopt")
    out["modelopt"] = mo
    return out


@pytest.mark.slow
def test_every_pinned_compressed_tensors_parses_our_config(configs):
    wheels = [str(wheel(f"compressed-tensors=={v}")) for v in CT]
    frozendict = str(wheel(next(p for p in PINS if p.startswith("frozendict"))))
    nv = configs["nvfp4"]
    # a control the old releases must refuse: the preset's scale_dtype (extra fields forbidden
    # in 0.11-0.12), as mxptq wrote it before
    control = json.loads(json.dumps(nv))
    control["config_groups"]["group_0"]["weights"]["scale_dtype"] = "torch.float8_e4m3fn"
    todo = {"nvfp4": nv, "mxfp4": configs["mxfp4"], "control": control}
    r = subprocess.run([sys.executable, "-c", PARSE, json.dumps(todo), frozendict, *wheels],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {tuple(ln.split()[:2]): ln.split()[2] for ln in r.stdout.splitlines()}
    for v, w in zip(CT, wheels, strict=True):
        name = Path(w).name
        assert got[name, "nvfp4"] == "ok", v
        old = tuple(map(int, v.split(".")[:2])) < (0, 13)
        # MXFP4 (mxfp4-pack-quantized) exists from 0.13 on; vLLM releases that pin older ones
        # cannot serve it at all
        assert got[name, "mxfp4"] == ("FAIL" if old else "ok"), v
        assert got[name, "control"] == ("FAIL" if old else "ok"), v


def _modelopt_converter():
    """modelopt/torch/export/convert_hf_config.py from the wheel, without importing ModelOpt
    (it needs a GPU stack); the file itself imports only the standard library."""
    with zipfile.ZipFile(wheel(next(p for p in PINS if p.startswith("nvidia-modelopt")))) as z:
        src = z.read("modelopt/torch/export/convert_hf_config.py").decode()
    spec = importlib.util.spec_from_loader("modelopt_convert_hf_config", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, "convert_hf_config.py", "exec"), mod.__dict__)  # noqa: S102
    return mod.convert_hf_quant_config_format


@pytest.mark.parametrize("w4a4", [False, True])
def test_modelopt_converter_gives_our_flat_config(configs, tmp_path, w4a4):
    """config.json's quantization_config is what ModelOpt makes of our hf_quant_config.json,
    plus the top-level group_size TensorRT-LLM's flat reader looks for."""
    convert = _modelopt_converter()
    from mxptq.checkpoint.dialects import get_dialect
    from mxptq.formats import get_format

    d, fmt = get_dialect("modelopt"), get_format("nvfp4")
    ignore = ["lm_head", "model.layers.0.mlp.gate"]
    hf = d.extra_files(fmt, ignore, w4a4)["hf_quant_config.json"]
    ours = d.config(fmt, "absmax", ignore, w4a4)
    assert ours == {**convert(hf), "group_size": 16}
    written = configs["modelopt"]
    qc = json.loads((written / "config.json").read_text())["quantization_config"]
    assert qc == {**convert(json.loads((written / "hf_quant_config.json").read_text())),
                  "group_size": 16}
    assert re.fullmatch(r"mxptq-[\w.]+", qc["producer"]["version"])
