"""The kernel benchmark's table logic on the CPU (the GPU figures come from running it on a
GPU): one tiny shape under the interpreter, every kernel and tile variant, bytes checked."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from mxptq.bench import kernels as bench  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_table_runs_on_a_tiny_shape(tmp_path):
    out = tmp_path / "t.md"
    argv = ["--out", str(out), "--device", "cpu", "--shapes", "2x32", "--reps", "1"]
    assert bench.table_main(argv) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 2x32 |")]
    labels = [r.split("|")[2].strip() for r in rows]
    expected = [k[0] for k in bench.KERNELS]
    expected += [f"{s} {t}/{w}" for s, cs in bench.VARIANTS.items() for t, w in cs]
    assert labels == expected
    assert all(r.rstrip().endswith("| yes |") and r.count("|") == 8 for r in rows)
