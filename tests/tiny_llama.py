"""A tiny random Llama with a word-level tokenizer and text in its vocabulary: calibration tests
that need no downloaded model or text."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(253)]  # with <unk>, <s>, </s>: a vocabulary of 256


def tiny_llama(folder: Path, layers: int = 4, context: int = 64, seed: int = 0) -> Path:
    """Save a random LlamaForCausalLM (hidden 64, K = 64 and 128: every Linear quantizable)
    and its tokenizer into `folder`."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = T.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=context,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(cfg)
    with torch.no_grad():  # heavier tails than the init, so that methods differ visibly
        for p in model.parameters():
            p.mul_(1 + 3 * torch.rand_like(p) ** 8)
    model.save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>").save_pretrained(folder)
    return folder


def tiny_text(path: Path, words: int = 4000, seed: int = 0) -> Path:
    """Sentences of the tokenizer's words, a Zipf-like choice so the text has structure."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    path.write_text(" ".join(rng.choices(WORDS, weights, k=words)))
    return path
