"""Calibration text to token windows: deterministic given the seed, from a local file or,
when online, a `datasets` name."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MxptqError

# Well-known `datasets` names -> (path, config, split, text column).
DATASETS = {
    "wikitext-2-raw-v1": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
}
DOC_SEPARATOR = "<|endoftext|>"


def _read_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows and "text" not in rows[0]:
            raise MxptqError(f"{path}: JSONL rows need a 'text' field")
        return "\n\n".join(r["text"] for r in rows)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise MxptqError(f"{path}: parquet file needs a 'text' column")
        return "\n\n".join(t for t in table.column("text").to_pylist() if t)
    return path.read_text()


def _read_dataset(name: str) -> str:
    repo, config, split, column = DATASETS.get(name, (name, None, "train", "text"))
    try:
        import datasets

        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # offline, unknown name, gated: all end the same way for the user
        raise MxptqError(
            f"calibration source {name!r} is not a local file and could not be loaded with "
            f"datasets ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass a .txt, .jsonl or .parquet file"
        ) from None
    return "\n\n".join(t for t in ds[column] if t)


def load_text(source: str | Path) -> str:
    """The whole text of a local .txt/.jsonl/.parquet file or of a `datasets` name."""
    path = Path(source)
    if path.is_file():
        return _read_file(path)
    return _read_dataset(str(source))


def load_calibration(
    source: str | Path, tokenizer, n_samples: int = 128, seqlen: int = 2048, seed: int = 0
) -> torch.Tensor:
    """`n_samples` random windows of `seqlen` tokens, LongTensor [n, seqlen].

    The text is concatenated and tokenized once without special tokens; window starts come
    from a `torch.Generator` seeded with `seed`, so the same inputs give the same tensor.
    """
    if n_samples < 1 or seqlen < 2:
        raise MxptqError("need at least 1 calibration sample of at least 2 tokens")
    # verbose=False: the whole text is longer than the model context on purpose; no warning
    ids = tokenizer(load_text(source), add_special_tokens=False, verbose=False).input_ids
    if len(ids) < seqlen:
        raise MxptqError(f"calibration text has {len(ids)} tokens, fewer than seqlen {seqlen}")
    ids = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
