"""Tiny random models built from configs with a fixed seed (no downloads, no ../shared), with a
character-level tokenizer so that calibration (W4A4) can run on a text the test writes."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers as T

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=128, tie_word_embeddings=False)
ARCHS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
                  dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2)),
    # DeepSeek-V3 style: layer 0 a dense MLP, layer 1 shared + routed experts; MLA with a q LoRA
    "deepseek_v3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM,
                    dict(n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32,
                         num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
                         q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
                         qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4)),
}

# Other families (not in ARCHS, which the engine tests run through every serving engine)
FAMILIES = {
    "bert": (T.BertConfig, T.BertModel, {}),  # an encoder: its layers are encoder.layer
    "t5": (T.T5Config, T.T5ForConditionalGeneration, dict(d_ff=128, d_kv=16)),  # two stacks
}


def save_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (printable ASCII, ids 1..95) for the 128-token vocab."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def make(folder: Path, arch: str, shard: str | None = None, **overrides) -> Path:
    """Save a seeded random `arch` model (plus tokenizer) into `folder`, in shards of at most
    `shard` (e.g. "40KB") when given."""
    cfg_cls, cls, extra = {**ARCHS, **FAMILIES}[arch]
    torch.manual_seed(0)
    model = cls(cfg_cls(**{**COMMON, **extra, **overrides}))
    with torch.no_grad():  # heavier tails than the default init, like trained weights
        for p in model.parameters():
            p.mul_(1 + 3 * torch.rand_like(p) ** 8)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    save_tokenizer(folder)
    return folder


def calibration_text(path: Path, words: int = 3000) -> Path:
    """Seeded pseudo-text, enough for a few windows of 32 characters."""
    rng = random.Random(0)
    vocab = ["the", "model", "expert", "router", "scale", "block", "weight", "token", "layer",
             "quantized", "engine", "loads", "dense", "packed", "and", "of", "a", "to"]
    path.write_text(" ".join(rng.choice(vocab) for _ in range(words)) + "\n")
    return path
