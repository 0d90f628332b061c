"""Perplexity and KL divergence of causal LMs.

- "docs": the text is split on `<|endoftext|>`; each document is
  [BOS] + tok(document.strip())[:ctx-1] (a longer document's tail is not scored).
- "stream": the whole text is tokenized once (no special tokens) and cut into consecutive
  chunks of ctx-1 tokens, each with BOS prepended (chunks of one token are dropped).
- "auto": docs when the text has a `<|endoftext|>` separator, else stream; so a plain corpus
  such as WikiText's wiki.test.raw is scored whole, not as one cut document.
PPL = exp(Σ next-token cross-entropy / number of predicted tokens). KL is the mean over the
same predicted positions of KL(P_ref ‖ P_quant) of the next-token distributions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .calibration.data import DOC_SEPARATOR, load_text

MODES = ("auto", "docs", "stream")


@dataclass
class EvalResult:
    value: float  # perplexity, or mean KL in nats
    mean: float  # mean NLL per token (perplexity) or mean KL per token
    tokens: int
    sequences: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sequences:
    """What `prepare` chose to score: the sequences, the mode it resolved, and the tokens of
    documents longer than the context that docs mode leaves out."""

    seqs: list[list[int]]
    mode: str
    cut_docs: int = 0
    cut_tokens: int = 0


def resolve_mode(text: str, mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown eval mode {mode!r} (one of {', '.join(MODES)})")
    if mode == "auto":
        return "docs" if DOC_SEPARATOR in text else "stream"
    return mode


def prepare(
    tokenizer, text: str, mode: str = "auto", ctx: int = 512, max_sequences: int | None = None,
) -> Sequences:
    """The token sequences scored, each starting with BOS (see the module docstring)."""
    if ctx < 2:
        raise ValueError(f"ctx {ctx}: a sequence needs BOS and at least one token to predict")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences {max_sequences}: must be at least 1")
    mode = resolve_mode(text, mode)
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token")
    n = ctx - 1
    out = Sequences([], mode)
    if mode == "docs":
        for d in (d.strip() for d in text.split(DOC_SEPARATOR)):
            if not d:
                continue
            ids = tokenizer(d, add_special_tokens=False, verbose=False).input_ids
            out.seqs.append([bos] + ids[:n])
            if len(ids) > n:
                out.cut_docs += 1
                out.cut_tokens += len(ids) - n
    else:
        ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
        out.seqs = [[bos] + ids[i : i + n] for i in range(0, len(ids), n)
                    if len(ids[i : i + n]) > 1]
    out.seqs = [s for s in out.seqs if len(s) > 1][:max_sequences]
    return out


def sequences(
    tokenizer, text_or_path: str | Path, mode: str = "docs", ctx: int = 512,
    max_sequences: int | None = None,
) -> list[list[int]]:
    """The token sequences scored, each starting with BOS."""
    text = load_text(text_or_path) if _is_source(text_or_path) else str(text_or_path)
    return prepare(tokenizer, text, mode, ctx, max_sequences).seqs


def _is_source(x: str | Path) -> bool:
    """A path or a dataset name rather than literal text (literal text has whitespace)."""
    return isinstance(x, Path) or Path(x).is_file() or not any(c.isspace() for c in x)


def _logits(model, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    dev = next(model.parameters()).device
    x = torch.tensor([seq], device=dev)
    return model(x, use_cache=False).logits[0, :-1].float(), x[0, 1:]


def reference_logprobs(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Next-token log-probabilities of `model` per sequence (CPU), to score many quantized
    variants against one original without re-running it."""
    with torch.no_grad():
        return [F.log_softmax(_logits(model, s)[0], -1).cpu() for s in seqs]


def score(
    model, seqs: list[list[int]], ref: list[torch.Tensor] | None = None
) -> tuple[EvalResult, EvalResult | None]:
    """Perplexity of `model` on `seqs` and, given the original's `reference_logprobs`, the mean
    per-token KL(P_ref ‖ P_model), from one forward pass per sequence."""
    nll, kl, cnt = 0.0, 0.0, 0
    with torch.no_grad():
        for i, s in enumerate(seqs):
            lg, y = _logits(model, s)
            nll += F.cross_entropy(lg, y, reduction="sum").item()
            if ref is not None:
                lp = F.log_softmax(lg, -1).cpu()
                kl += F.kl_div(lp, ref[i], log_target=True, reduction="sum").item()
            cnt += y.numel()
    ppl = EvalResult(math.exp(nll / cnt), nll / cnt, cnt, len(seqs))
    return ppl, (EvalResult(kl / cnt, kl / cnt, cnt, len(seqs)) if ref is not None else None)


def perplexity(
    model, tokenizer, text_or_path: str | Path, mode: str = "docs", ctx: int = 512,
    max_sequences: int | None = None,
) -> EvalResult:
    """exp(mean next-token NLL) over the sequences of `sequences(...)`."""
    return score(model, sequences(tokenizer, text_or_path, mode, ctx, max_sequences))[0]


def kl_divergence(
    model_ref, model_q, tokenizer, text_or_path: str | Path, mode: str = "docs",
    ctx: int = 512, max_sequences: int | None = None,
) -> EvalResult:
    """Mean per-token KL(P_ref ‖ P_q) in nats over the same sequences as `perplexity`."""
    seqs = sequences(tokenizer, text_or_path, mode, ctx, max_sequences)
    return score(model_q, seqs, reference_logprobs(model_ref, seqs))[1]
