"""Show what `make demo` wrote: the packed layers, and that transformers + compressed-tensors load
the checkpoint and embed sentences like the original model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mxptq.checkpoint import checkpoint_format, read_checkpoint

SENTENCES = ["A cat sat on the mat.", "The stock market fell sharply today.",
             "Four-bit weights with searched block scales."]


def main(out: str) -> None:
    from transformers import AutoModel, AutoTokenizer

    folder = Path(out)
    q = read_checkpoint(folder)
    name = next(iter(q))
    rep = json.loads((folder / "mxptq_report.json").read_text())
    dialect, fmt = checkpoint_format(folder)
    print(f"{len(q)} Linear layers packed as {fmt.name} ({dialect}); e.g. {name}: codes "
          f"{tuple(q[name].codes.shape)} uint8, scales {tuple(q[name].scales.shape)} "
          f"{q[name].scales.dtype}; mean relative MSE "
          f"{rep['quantization_error']['rel_mse_mean']:.2e}")
    src = Path(rep["flags"]["model"])
    tok = AutoTokenizer.from_pretrained(folder)
    b = tok(SENTENCES, padding=True, return_tensors="pt")
    mask = b["attention_mask"].unsqueeze(-1).float()
    embs = []
    for path in (src, folder):
        model = AutoModel.from_pretrained(path, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            h = model(**b).last_hidden_state.float()
        embs.append((h * mask).sum(1) / mask.sum(1))
    cos = F.cosine_similarity(embs[0], embs[1], dim=-1)
    print("transformers loaded it; cosine similarity of sentence embeddings vs the original:")
    for s, c in zip(SENTENCES, cos.tolist(), strict=True):
        print(f"  {c:.4f}  {s}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/minilm-nvfp4")
