"""The runtime benchmarks' own logic on CPU (the GPU figures come from running them on a GPU):
`mxptq.bench.generate` builds, quantizes (`mxptq quantize` in a child process), loads packed and
times a tiny MoE model eagerly."""

from __future__ import annotations

import pytest

from mxptq.bench import generate


@pytest.mark.slow
def test_generate_benchmark_runs_on_a_tiny_moe(tmp_path):
    out = tmp_path / "table.md"
    argv = ["--arch", "tiny-moe", "--device", "cpu", "--modes", "eager", "--batch", "1",
            "--new-tokens", "3", "--repeats", "1", "--work", str(tmp_path / "w"), "--out", str(out)]
    assert generate.main(argv) == 0
    text = out.read_text()
    assert (tmp_path / "w" / "q-tiny-moe-2" / "model.safetensors.index.json").is_file()
    assert "check: PackedExperts decode path vs its loop, 16 tokens: rel diff 0.0e+00" in text
    row = [line for line in text.splitlines() if line.startswith("| 1 | eager |")]
    assert len(row) == 1 and row[0].count("|") == 7
