"""GGUF files as `--model`: read with the `gguf` package, dequantized, written once as a Hugging
Face folder (config, tokenizer, safetensors shards) in the cache, then quantized like any other
source.

GGUF tensors are dequantized by `gguf.dequantize` (gguf-py's reference dequantizers, what
llama.cpp computes in fp32), so F32, F16 and BF16 tensors keep their exact values and dtype and
quantized types (Q8_0, Q4_K, ...) become their exact fp32 dequantization. Names, the config and
the per-architecture tensor fix-ups (Llama's q/k row permutation, MoE expert stacking, ...) come
from transformers' own GGUF loader (`transformers.modeling_gguf_pytorch_utils`: `load_gguf_
checkpoint` for the config, `get_gguf_hf_weights_map` and `TENSOR_PROCESSORS` for the tensors),
so the folder holds what `from_pretrained(dir, gguf_file=...)` would load, but tensor by tensor
into bounded shards instead of the whole model in memory.

A folder whose config.json says `quantization_config: {quant_method: gguf}` (what saving a
model loaded with `gguf_file=` leaves behind) holds dense weights: `dense_view` gives a view of
it without that block, and with `architectures` filled in when missing.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import MxptqError

SHARD_BYTES = 2 << 30  # output shard size
CONVERTER = "mxptq-gguf-1"  # part of the cache key: bump when the conversion changes
MARKER = ".mxptq-gguf.json"  # written last: a folder without it is not finished
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_PRIVATE: Path | None = None


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `--model` names: the file itself, or the only .gguf of a folder that has
    no safetensors weights; None when it is not a GGUF source."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise MxptqError(f"--model {path}: holds {len(found)} GGUF files ({names}); pass one "
                         "of them as --model")
    return found[0] if found else None


def _cache_root() -> Path:
    from .skeleton import cache_dir

    global _PRIVATE
    root = cache_dir()
    if root is None:  # MXPTQ_NO_CACHE: a folder of this process only, removed at exit
        if _PRIVATE is None:
            _PRIVATE = Path(tempfile.mkdtemp(prefix="mxptq-gguf-"))
            atexit.register(shutil.rmtree, _PRIVATE, True)
        root = _PRIVATE
    return root / "gguf"


def _key(path: Path, extra: str = "") -> str:
    st = path.stat()
    ident = f"{CONVERTER}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{extra}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def gguf_folder(gguf: Path) -> Path:
    """The converted folder of `gguf`, from the cache or written now (a folder that another
    run left unfinished is written again), with a progress bar on a terminal's stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    gguf = gguf.resolve()
    folder = _cache_root() / f"{gguf.stem}-{_key(gguf)}"
    if (folder / MARKER).is_file():
        return folder
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as e:
        raise MxptqError(f"--model {gguf}: reading GGUF needs the `gguf` package "
                         "(pip install 'mxptq[gguf]' or pip install gguf)") from e
    console = Console(stderr=True)
    console.print(f"reading {gguf.name}: dequantizing into {folder} (once; cached)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        with Progress(TextColumn("[bold]read gguf"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("tensors"), TimeElapsedColumn(), console=console,
                      disable=not console.is_terminal) as bar:
            task = bar.add_task("g", total=None)
            convert_gguf(gguf, tmp, lambda i, n: bar.update(task, completed=i, total=n))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


class _Shards:
    """Tensors into safetensors shards of about SHARD_BYTES, then the HF index."""

    def __init__(self, folder: Path):
        self.folder, self.cur, self.size, self.files = folder, {}, 0, []
        self.where: dict[str, int] = {}
        self.dtype_bytes: dict = {}  # dtype -> bytes written in it

    def add(self, name: str, t) -> None:
        if name in self.where or name in self.cur:
            raise MxptqError(f"GGUF: two tensors map to {name}")
        if self.cur and self.size + t.numel() * t.element_size() > SHARD_BYTES:
            self.flush()
        self.cur[name] = t.contiguous()
        self.size += t.numel() * t.element_size()
        self.dtype_bytes[t.dtype] = self.dtype_bytes.get(t.dtype, 0) + t.numel() * t.element_size()

    def flush(self) -> None:
        if not self.cur:
            return
        from safetensors.torch import save_file

        i = len(self.files)
        path = self.folder / f"part-{i:05d}.safetensors"
        save_file(self.cur, str(path), metadata={"format": "pt"})
        self.files.append(path)
        self.where.update(dict.fromkeys(self.cur, i))
        self.cur, self.size = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        n = len(self.files)
        names = (["model.safetensors"] if n == 1 else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        for p, name in zip(self.files, names, strict=True):
            os.replace(p, self.folder / name)
        if n > 1:
            total = sum((self.folder / f).stat().st_size for f in names)
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: names[i] for k, i in sorted(self.where.items())}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return sorted(self.where)


def _torch_dtype(qtype):
    """The dtype that holds a GGML type's dequantized values exactly."""
    import torch
    from gguf import GGMLQuantizationType as Q

    return {Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(qtype, torch.float32)


def convert_gguf(gguf: Path, folder: Path, on_tensor=None) -> dict:
    """Write the HF folder of `gguf` into `folder`; returns what the marker file records.
    `on_tensor(done, total)` follows the tensors."""
    import numpy as np
    import torch
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    try:
        parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)
        config = AutoConfig.for_model(**parsed["config"])  # as AutoTokenizer does for a GGUF
    except Exception as e:  # transformers raises ValueError/KeyError for what it cannot map
        raise MxptqError(f"--model {gguf}: transformers cannot read this GGUF's metadata "
                         f"({type(e).__name__}: {e})") from None
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(meta).__name__]
    reader = GGUFReader(str(gguf))
    arch = str(reader.fields["general.architecture"].contents())
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    key_map = get_gguf_hf_weights_map(meta, processor)
    shards = _Shards(folder)
    staged = {"tensors": {}}  # what processors assemble from several GGUF tensors (experts)
    skipped, types = [], {}

    def flush_staged(before_layer: int | None) -> None:
        for name in list(staged["tensors"]):
            m = _LAYER.search(name)
            if before_layer is None or (m and int(m[1]) < before_layer):
                shards.add(name, staged["tensors"].pop(name))

    for i, t in enumerate(reader.tensors):
        if on_tensor is not None:
            on_tensor(i, len(reader.tensors))
        m = _BLOCK.match(t.name)
        flush_staged(int(m[1]) if m else None)
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise MxptqError(f"--model {gguf}: tensor {t.name} has GGML type "
                             f"{t.tensor_type.name}, which gguf cannot dequantize") from None
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        res = processor.process(weights=w, name=t.name, tensor_key_mapping=key_map,
                                parsed_parameters=staged)
        if res.name is None:  # stored into staged by the processor
            continue
        if res.name not in key_map:
            skipped.append(t.name)
            continue
        tensor = torch.from_numpy(np.array(res.weights, copy=True))  # gguf maps the file read-only
        shards.add(key_map[res.name], tensor.to(_torch_dtype(t.tensor_type)))
    flush_staged(None)
    written = set(shards.finish())
    _check_complete(meta, config, written, gguf)
    main = max(shards.dtype_bytes, key=shards.dtype_bytes.get)
    config.dtype = str(main).removeprefix("torch.")  # what most of the weights are stored in
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    tokenizer = _save_tokenizer(gguf, folder)
    info = {"source": str(gguf), "size": gguf.stat().st_size, "architecture": arch,
            "ggml_types": types, "skipped": skipped, "tokenizer": tokenizer,
            "converter": CONVERTER}
    (folder / MARKER).write_text(json.dumps(info, indent=2))
    return info


def _check_complete(meta, config, written: set[str], gguf: Path) -> None:
    tied = set()
    if config.get_text_config().tie_word_embeddings and meta.get_output_embeddings() is not None:
        tied = {n for n, p in meta.named_parameters() if p is meta.get_output_embeddings().weight}
    missing = sorted(n for n, _ in meta.named_parameters() if n not in written and n not in tied)
    if missing:
        raise MxptqError(f"--model {gguf}: the GGUF has no tensor for {len(missing)} parameters "
                         f"of {type(meta).__name__} (e.g. {missing[0]})")


def _save_tokenizer(gguf: Path, folder: Path) -> bool:
    """transformers' GGUF tokenizer conversion; a GGUF without a usable tokenizer still
    quantizes (calibrate it with `--calib generate`)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception:  # no tokenizer in the file, or one transformers cannot convert
        return False
    tok.save_pretrained(folder)
    return True


def dense_view(model_dir: Path) -> Path:
    """`model_dir`, or for a config with `quant_method: gguf` (dense weights that a GGUF load
    left marked as quantized) a cached view of it: hard links to its files (copies across file
    systems; symbolic links would leave the folder, which the containment rule refuses) and a
    config.json without that block, with `architectures` filled in from the model type when
    missing."""
    cfg_path = model_dir / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return model_dir
    qc = config.get("quantization_config")
    if not (isinstance(qc, dict) and qc.get("quant_method") == "gguf"):
        return model_dir
    config.pop("quantization_config")
    if not config.get("architectures"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
        if arch:
            config["architectures"] = [arch]
    view = _cache_root() / f"dense-{model_dir.name}-{_key(cfg_path, str(model_dir.resolve()))}"
    if (view / "config.json").is_file():
        return view
    tmp = Path(tempfile.mkdtemp(prefix=f".{view.name}-", dir=_mkdir(view.parent)))
    for p in model_dir.iterdir():
        if p.name != "config.json" and not p.name.startswith("."):
            _link_or_copy(p.resolve(), tmp / p.name)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(view, ignore_errors=True)
    os.replace(tmp, view)
    return view


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
