"""Stream a checkpoint shard by shard: a reader thread loads tensors (and the amax of fused
partners stored in other shards), the main thread quantizes on the device, a writer thread
writes each finished output shard. Output goes to a hidden folder next to --out, renamed into
place only when complete; finished shards are recorded there so --resume can continue."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .checkpoint.report import write_report
from .checkpoint.safetensors_io import INDEX_NAME, ShardWriter, write_index
from .errors import MxptqError
from .plan import Item, Plan
from .tensor import QuantizedTensor, dequantize, quantize_tensor

STATE_NAME = ".mxptq-state.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
FAIL_AFTER_ENV = "MXPTQ_FAIL_AFTER_SHARD"  # testing hook: crash after this many output shards
_PREFETCH_BUNDLES = 4  # bundles read ahead of the device
_WRITE_QUEUE = 8  # output tensors waiting for the writer
_READ_THREADS = 4


@dataclass
class CalibData:
    """What calibration hands the streaming pass, keyed by output module name."""

    importance: dict[str, torch.Tensor] = field(default_factory=dict)  # E[x²] (--importance)
    gptq: dict[str, QuantizedTensor] = field(default_factory=dict)  # written instead of RTN
    acts: dict = field(default_factory=dict)  # W4A4: module -> ActivationScale
    summary: dict = field(default_factory=dict)  # recorded in the report


@dataclass
class RunOptions:
    out: Path
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False
    flags: dict = field(default_factory=dict)  # recorded in the report and the resume signature
    calib: CalibData | None = None


@dataclass
class _Bundle:
    """Tensors quantized together: one item, or the in-shard members of a fused set, plus the
    amax of partners that live in other shards."""

    items: list[Item]
    futures: list[Future]  # the tensors, being read
    partner_amax: float | None = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [f.result() for f in self.futures]


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.mxptq-partial"


def output_shard_names(plan: Plan) -> dict[str, str]:
    n = len(plan.shards)
    if n == 1:
        return {plan.shards[0].name: "model.safetensors"}
    return {s.name: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, s in enumerate(plan.shards)}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MxptqError("--device cuda: no CUDA device is available")
    if device not in ("cuda", "cpu"):
        raise MxptqError(f"unknown device {device!r} (auto, cuda or cpu)")
    return torch.device(device)


def _backend(device: torch.device) -> str:
    """The Triton kernels on CUDA when they are installed, else the torch reference."""
    if device.type != "cuda":
        return "torch"
    try:
        from .kernels import quantize  # noqa: F401
    except ImportError:
        return "torch"
    return "auto"


def prepare_output(out: Path, overwrite: bool, resume: bool) -> Path:
    """Check --out before heavy work and return the partial folder to write into."""
    if out.exists() and not out.is_dir():
        raise MxptqError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MxptqError(f"--out {out}: folder is not empty (pass --overwrite to replace it)")
    tmp = partial_dir(out)
    if tmp.exists() and not resume:
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        probe = tmp / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MxptqError(f"--out {out}: cannot write there ({e.strerror or e})") from e
    return tmp


def signature(plan: Plan, flags: dict) -> str:
    """What must be equal for --resume to continue a run: flags and the input headers."""
    h = hashlib.sha256(json.dumps(flags, sort_keys=True, default=str).encode())
    for it in plan.items:
        h.update(f"{it.name}|{it.info.shard}|{it.info.dtype}|{it.info.shape}|{it.action}".encode())
    return h.hexdigest()


class Quantizer:
    """Quantize the items of a bundle on the device; returns output tensors and statistics."""

    def __init__(self, plan: Plan, device: torch.device, calib: CalibData | None = None):
        self.plan, self.device, self.backend = plan, device, _backend(device)
        self.calib = calib or CalibData()

    def _gptq(self, modules: list[str]) -> QuantizedTensor | None:
        """GPTQ's bytes for these Linears stacked by rows (an expert's gate and up), if any."""
        parts = [self.calib.gptq.get(m) for m in modules]
        if not parts or any(p is None for p in parts):
            return None
        if len(parts) == 1:
            return parts[0]
        return QuantizedTensor(torch.cat([p.codes for p in parts]),
                               torch.cat([p.scales for p in parts]),
                               parts[0].global_scale, parts[0].format)

    def _one(self, w: torch.Tensor, name: str, modules: list[str], amax) -> tuple:
        """RTN (importance-weighted when calibration gave one) unless GPTQ already chose the
        bytes; the error is measured against the original weight either way."""
        module = modules[0]
        qt = self._gptq(modules)
        if qt is None:
            imp = self.calib.importance.get(module)
            try:
                qt = quantize_tensor(
                    w, self.plan.fmt, self.plan.scale,
                    importance=None if imp is None else imp.to(self.device),
                    global_amax=amax, backend=self.backend,
                )
            except ValueError as e:
                raise MxptqError(f"tensor {name}: {e}") from e
        wf = w.float()
        den = float((wf * wf).sum())
        err = float(((wf - dequantize(qt).to(wf.device)) ** 2).sum())
        return qt.to("cpu"), err, den

    def _write(self, module: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """The dialect's tensors of one Linear, plus its activation scale under W4A4."""
        d = self.plan.dialect
        out = d.tensors(module, qt)
        if self.plan.w4a4:
            out.update(d.input_tensors(module, self.calib.acts[module]))
        return out

    def run(self, b: _Bundle) -> tuple[dict[str, torch.Tensor], list[dict]]:
        dev = [t.to(self.device, non_blocking=True) for t in b.tensors]
        amax = None
        if len(b.items) > 1 or b.partner_amax is not None:
            amax = torch.stack([t.abs().amax().float() for t in dev]).amax()
            if b.partner_amax is not None:
                amax = torch.maximum(amax, torch.tensor(b.partner_amax, device=self.device))
        out: dict[str, torch.Tensor] = {}
        stats: list[dict] = []
        for it, w in zip(b.items, dev, strict=True):
            if it.layout is None:
                qt, err, den = self._one(w, it.name, it.modules[:1], amax)
                out.update(self._write(it.modules[0], qt))
            else:
                err = den = 0.0
                for e in range(w.shape[0]):
                    we = w[e] if it.layout == "out_in" else w[e].t().contiguous()
                    # gate and up of one expert share its input, hence the first's importance
                    mods = it.modules[e * it.split : (e + 1) * it.split]
                    qt, e_err, e_den = self._one(we, f"{it.name}[{e}]", mods, None)
                    err, den = err + e_err, den + e_den
                    rows = qt.codes.shape[0] // it.split
                    for j in range(it.split):
                        part = type(qt)(
                            qt.codes[j * rows : (j + 1) * rows],
                            qt.scales[j * rows : (j + 1) * rows],
                            qt.global_scale,
                            qt.format,
                        )
                        out.update(self._write(it.modules[e * it.split + j], part))
            stats.append(
                {"name": it.name, "shape": list(it.info.shape), "group": it.group,
                 "rel_mse": err / den if den else 0.0}
            )
        return out, stats


def _reader(plan: Plan, shards: list[Path], q: queue.Queue, stop: threading.Event,
            pin: bool, device: torch.device) -> None:
    """Produce bundles shard by shard, in plan order, their tensors read by a small thread pool
    (the bounded queue limits what is in flight) and decoded to true values when the source
    stores them quantized (`plan.source`, on the GPU when there is one); partners in other
    shards contribute only their amax."""
    by_shard = plan.by_shard()
    where = {it.name: it for it in plan.items}
    pool = ThreadPoolExecutor(max_workers=_READ_THREADS, thread_name_prefix="mxptq-read")
    fds: list[int] = []
    try:
        for shard in shards:
            fd = os.open(shard, os.O_RDONLY)
            fds.append(fd)
            done: set[str] = set()
            for it in by_shard.get(shard.name, []):
                if stop.is_set():
                    return
                if it.name in done:
                    continue
                members, amax = [it], None
                if it.action == "quantize" and it.group:
                    group = [where[n] for n in plan.groups[it.group]]
                    members = [m for m in group if m.info.shard == shard.name]
                    for m in group:
                        if m.info.shard != shard.name:
                            pfd = os.open(plan.model_dir / m.info.shard, os.O_RDONLY)
                            try:
                                a = float(plan.source.read(pfd, m.info, device=device)
                                          .abs().amax().float())
                            finally:
                                os.close(pfd)
                            amax = a if amax is None else max(amax, a)
                done.update(m.name for m in members)
                on_gpu = pin and it.action == "quantize"
                futs = [pool.submit(plan.source.read, fd, m.info, on_gpu, device,
                                    m.action == "keep") for m in members]
                q.put(_Bundle(members, futs, amax))
            q.put(shard.name)
        q.put(None)
    except BaseException as e:  # handed to the main thread, which re-raises it
        q.put(e)
    finally:
        pool.shutdown(wait=True)
        for fd in fds:
            os.close(fd)


class _Writer(threading.Thread):
    """Writes output tensors at their planned offsets as they arrive, one shard at a time, and
    records each finished shard in the state file (what --resume reads)."""

    def __init__(self, plan: Plan, tmp: Path, names: dict[str, str], state: dict):
        super().__init__(daemon=True)
        self.plan, self.tmp, self.names, self.state = plan, tmp, names, state
        self.q: queue.Queue = queue.Queue(maxsize=_WRITE_QUEUE)
        self.error: BaseException | None = None
        self.specs = {}
        for it in plan.items:
            self.specs.setdefault(it.info.shard, {}).update(plan.output_specs(it))

    def run(self) -> None:
        w: ShardWriter | None = None
        while True:
            msg = self.q.get()
            try:
                if msg is None:
                    if w is not None:
                        w.abort()
                    return
                if self.error is not None:
                    continue
                if msg[0] == "open":
                    w = ShardWriter(self.tmp / self.names[msg[1]], self.specs[msg[1]])
                elif msg[0] == "put":
                    w.put(msg[1], msg[2])
                else:  # ("close", shard, stats, seconds)
                    size = w.close()
                    w = None
                    self.state["done"][msg[1]] = {
                        "file": self.names[msg[1]], "size": size, "stats": msg[2],
                        "seconds": msg[3],
                    }
                    (self.tmp / STATE_NAME).write_text(json.dumps(self.state))
            except BaseException as e:  # re-raised in the main thread by send/finish
                self.error = e
                if w is not None:
                    w.abort()
                    w = None
            finally:
                self.q.task_done()

    def send(self, *msg) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(msg)

    def flush(self) -> None:
        self.q.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.q.put(None)
        self.join()


def run(
    plan: Plan,
    opts: RunOptions,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Quantize the whole plan into opts.out; returns the report dict."""
    t0 = time.perf_counter()
    device = resolve_device(opts.device)
    tmp = prepare_output(opts.out, opts.overwrite, opts.resume)
    names = output_shard_names(plan)
    sig = signature(plan, opts.flags)
    state_path = tmp / STATE_NAME
    state = {"signature": sig, "done": {}}
    if opts.resume and state_path.is_file():
        prev = json.loads(state_path.read_text())
        if prev.get("signature") != sig:
            raise MxptqError(
                f"--resume: {tmp} holds a run with other flags or input; drop --resume"
            )
        state = prev
    state["done"] = {s: v for s, v in state["done"].items() if (tmp / v["file"]).is_file()}
    todo = [s for s in plan.shards if s.name not in state["done"]]
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)

    quant = Quantizer(plan, device, opts.calib)
    q: queue.Queue = queue.Queue(maxsize=_PREFETCH_BUNDLES)
    stop = threading.Event()
    pin = device.type == "cuda"
    reader = threading.Thread(target=_reader, args=(plan, todo, q, stop, pin, device),
                              daemon=True)
    writer = _Writer(plan, tmp, names, state)
    reader.start()
    writer.start()
    written = 0
    try:
        stats: list[dict] = []
        t_shard = time.perf_counter()
        opened = False
        while True:
            b = q.get()
            if isinstance(b, BaseException):
                raise b
            if b is None:
                break
            if isinstance(b, str):
                if not opened:  # a shard with no tensors
                    writer.send("open", b)
                writer.send("close", b, stats, time.perf_counter() - t_shard)
                stats, t_shard, opened = [], time.perf_counter(), False
                written += 1
                if fail_after and written >= fail_after:
                    writer.flush()
                    raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: simulated crash")
                continue
            if not opened:
                writer.send("open", b.items[0].info.shard)
                opened = True
            if b.items[0].action == "keep":
                writer.send("put", b.items[0].name, b.tensors[0])
            else:
                o, s = quant.run(b)
                for name, t in o.items():
                    writer.send("put", name, t)
                stats.extend(s)
            if on_progress:
                on_progress(len(b.items), sum(plan.source.nbytes(it.info) for it in b.items))
        writer.flush()
    except BaseException as e:
        stop.set()
        while reader.is_alive():
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.1)
        writer.stop()
        if isinstance(e, MxptqError):  # bad input: a resume would fail the same way
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    writer.stop()
    return finalize(plan, opts, tmp, names, state, time.perf_counter() - t0, device)


def finalize(plan, opts, tmp, names, state, seconds, device) -> dict:
    """Index, config, copied files and report; then move the folder into place."""
    weight_map = {}
    for it in plan.items:
        for n in plan.output_specs(it):
            weight_map[n] = names[it.info.shard]
    total = sum(v["size"] for v in state["done"].values())
    write_index(tmp, weight_map, total)
    _copy_side_files(plan.model_dir, tmp)
    config = json.loads((plan.model_dir / "config.json").read_text())
    config["quantization_config"] = plan.dialect.config(
        plan.fmt, plan.scale, plan.ignore, plan.w4a4
    )
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for fname, content in plan.dialect.extra_files(plan.fmt, plan.ignore, plan.w4a4).items():
        (tmp / fname).write_text(json.dumps(content, indent=2) + "\n")
    stats = [s for v in state["done"].values() for s in v["stats"]]
    calib = opts.calib.summary if opts.calib else None
    report = write_report(tmp, plan, opts.flags, stats, state, seconds, str(device), __version__,
                          calib)
    (tmp / STATE_NAME).unlink(missing_ok=True)
    out = opts.out
    if out.exists():
        old = out.parent / f".{out.name}.mxptq-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return report


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and other non-weight files, byte for byte."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if (
            p.is_dir()
            or rel.parts[0].startswith(".")
            or p.name.endswith(WEIGHT_SUFFIXES)
            or str(rel) in ("config.json", INDEX_NAME, "hf_quant_config.json")
        ):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst / rel)
