"""A new user's first minutes: every command's --help names its choices and defaults, starts
without importing torch, and the names it offers are the ones the code accepts."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mxptq.cli import app
from mxptq.names import BLOCK_SIZES, DIALECT_NAMES, FORMAT_NAMES, SELECTOR_NAMES

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("quantize", "inspect", "eval", "formats")


def help_text(*args: str) -> str:
    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return r.stdout


def options(text: str) -> dict[str, str]:
    """--option -> its help text (continuation lines joined), from click's plain help."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^\s{2}(-[-\w]+)(?:\s*/\s*-[-\w]+)?(?:\s+\S+)?(?:\s{2,}(.*))?$", line)
        if m:
            cur = m.group(1)
            out[cur] = m.group(2) or ""
        elif cur and line.startswith(" " * 10):
            out[cur] += " " + line.strip()
    return out


def test_the_names_offered_are_the_registries():
    from mxptq.checkpoint.dialects import DIALECTS
    from mxptq.formats import FORMATS
    from mxptq.scales import SELECTORS

    assert set(FORMAT_NAMES) == set(FORMATS)
    assert tuple(SELECTOR_NAMES) == tuple(SELECTORS)
    assert tuple(DIALECT_NAMES) == tuple(DIALECTS)
    from mxptq.formats import get_format

    for b in BLOCK_SIZES:
        get_format("nvfp4", b)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_states_its_default_or_that_it_is_required(command):
    text = help_text(command)
    assert "<str>" not in text and "<int>" not in text
    for opt, desc in options(text).items():
        if opt in ("--help",):
            continue
        assert re.search(r"default|[Rr]equired|\bstop\b|Print|Replace|Continue|Also show",
                         desc), f"{command} {opt}: {desc}"


def test_quantize_help_shows_choices_and_defaults():
    text = help_text("quantize")
    for names in (FORMAT_NAMES, SELECTOR_NAMES, DIALECT_NAMES):
        assert "[" + "|".join(names) + "]" in text
    opts = options(text)
    assert "(default: nvfp4)" in opts["--format"]
    assert "(default: search)" in opts["--scale"]
    assert "default: compressed-tensors" in opts["--dialect"]
    assert "E[x²]" in opts["--importance"]  # printed as written, not eaten as markup
    for name in ("absmax", "4over6", "search", "exhaustive"):
        assert f"{name}:" in opts["--scale"]  # what each choice means


def test_eval_help_names_the_loader_it_uses():
    opts = options(help_text("eval"))
    assert "mxptq.load" in opts["--quantized"] and "AutoModelForCausalLM" not in opts["--quantized"]
    assert "(default: auto)" in opts["--mode"] and "(default: 512)" in opts["--ctx"]


def test_help_does_not_import_torch():
    """`mxptq --help` and each command's --help start without torch or transformers (the
    import alone took seconds)."""
    code = (
        "import sys\n"
        "from mxptq.cli import app\n"
        "for args in ([], ['quantize'], ['inspect'], ['eval'], ['formats']):\n"
        "    try:\n"
        "        app([*args, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (args, e.code)\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, COLUMNS="120"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_readme_commands_are_real():
    """Every `mxptq ...` option the README shows is one the command accepts."""
    readme = (REPO / "README.md").read_text()
    known = {c: set(options(help_text(c))) for c in COMMANDS}
    shown = re.findall(r"^\s*mxptq (\w+) (.*)$", readme, flags=re.M)
    assert shown
    for command, rest in shown:
        assert command in known, command
        for opt in re.findall(r"(--[\w-]+)", rest):
            assert opt in known[command] or opt in ("--keep-lm-head", "--no-importance"), (
                command, opt)


def test_hub_id_without_network_says_how_to_proceed(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = CliRunner().invoke(app, ["quantize", "--model", "Qwen/Qwen3-8B", "--out",
                                 str(tmp_path / "o")], env=env)
    assert r.exit_code == 2
    (line,) = r.stderr.strip().splitlines()
    assert "offline" in line and "hf download Qwen/Qwen3-8B --local-dir DIR" in line
    assert "--model DIR" in line


def test_dry_run_says_so_and_its_json_names_the_choices(tmp_path):
    import json

    from real_assets import tiny_llama_dir

    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["quantize", "--model", str(tiny_llama_dir()), "--out", str(out),
                                 "--dry-run"])
    assert r.exit_code == 0 and "dry run: nothing was written" in r.stdout
    r = CliRunner().invoke(app, ["quantize", "--model", str(tiny_llama_dir()), "--out", str(out),
                                 "--dry-run", "--json", "--format", "mxfp4"])
    j = json.loads(r.stdout)
    assert j["dry_run"] is True and j["format"] == "mxfp4" and j["block_size"] == 32
    assert j["scale"] == "search" and j["dialect"] == "compressed-tensors"
    assert j["plan"]["quantize"] == 30 and not out.exists()
