"""Calibration text to token windows: determinism and the file formats."""

import json

import pytest
import torch
from real_assets import english_text, tiny_llama_dir
from transformers import AutoTokenizer

from mxptq.calibration import load_calibration
from mxptq.errors import MxptqError

MODEL = tiny_llama_dir()
CALIB = english_text()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL)


def test_same_seed_same_windows_other_seed_other_windows(tok):
    a = load_calibration(CALIB, tok, 8, 64, seed=3)
    b = load_calibration(CALIB, tok, 8, 64, seed=3)
    c = load_calibration(CALIB, tok, 8, 64, seed=4)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_windows_are_contiguous_runs_of_the_tokenized_text(tok):
    ids = tok(CALIB.read_text(), add_special_tokens=False).input_ids
    text_ids = torch.tensor(ids)
    for row in load_calibration(CALIB, tok, 3, 32, seed=0):
        starts = (text_ids[: len(ids) - 31] == row[0]).nonzero().flatten()
        assert any(torch.equal(text_ids[s : s + 32], row) for s in starts.tolist())


def test_jsonl_and_parquet_give_the_same_windows_as_the_joined_text(tok, tmp_path):
    rows = ["One day a cat sat on a mat.", "The dog ran to the park and played all day long."] * 20
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(rows))
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": r}) for r in rows))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    par = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": rows}), par)
    ref = load_calibration(txt, tok, 4, 16, seed=1)
    assert torch.equal(load_calibration(jl, tok, 4, 16, seed=1), ref)
    assert torch.equal(load_calibration(par, tok, 4, 16, seed=1), ref)


def test_unreachable_dataset_name_is_one_clear_error(tok, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MxptqError, match="could not be loaded with datasets"):
        load_calibration("no-such-dataset-xyz", tok, 2, 16)


def test_too_short_text_is_refused(tok, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("Once upon a time.")
    with pytest.raises(MxptqError, match="fewer than seqlen"):
        load_calibration(f, tok, 2, 512)
