"""Emulated NVFP4 attention (measurement only): Q, K and V are fake-quantized per 16-block
along head_dim, the attention probabilities P per 16-block along the keys, each with a dynamic
per-tensor global scale and block scales chosen by the given selector; the math is eager
attention in fp32. Registered with transformers' AttentionInterface so any model that uses the
interface (Llama, Qwen, Mistral, Gemma, ...) runs it. A head_dim or key count that 16 does not
divide is zero-padded to the next block (the padding is not part of any result)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .activations import fake_quantize_activation


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x if n == 1 else x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def make_attention(scale: str):
    """An eager attention function that fake-quantizes Q, K, V and P with selector `scale`."""

    def attention(module: nn.Module, query, key, value, attention_mask, scaling=None,
                  dropout: float = 0.0, **kwargs):
        q, k, v = (fake_quantize_activation(t.float(), None, scale) for t in (query, key, value))
        groups = query.shape[1] // key.shape[1]
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        scores = q @ k.transpose(2, 3) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : k.shape[-2]]
        p = fake_quantize_activation(torch.softmax(scores, dim=-1), None, scale)
        out = (p @ v).to(query.dtype).transpose(1, 2).contiguous()
        return out, p

    return attention


def use_emulated_attention(model: nn.Module, fmt: str = "nvfp4", scale: str = "search") -> str:
    """Switch `model` to the emulated attention; returns the registered implementation name."""
    if fmt != "nvfp4":
        raise ValueError(f"attention emulation supports nvfp4 only, not {fmt!r}")
    name = f"mxptq_{fmt}_{scale}"
    AttentionInterface.register(name, make_attention(scale))
    AttentionMaskInterface.register(name, eager_mask)
    model.set_attn_implementation(name)
    return name
