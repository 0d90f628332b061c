"""Stream a checkpoint shard by shard: a reader thread loads tensors (and the amax of fused
partners stored in other shards), the main thread quantizes on the device, a writer thread
writes each finished output shard. Output goes to a hidden folder next to --out (mxptq.outdir),
renamed into place only when complete; each finished shard is fsynced and recorded with its
SHA-256 there, so --resume continues from it after any crash and re-checks it first."""

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
from .checkpoint.durable import copy_atomic, event, fsync_dir, write_atomic
from .checkpoint.manifest import write_manifest
from .checkpoint.report import REPORT_NAME, write_report
from .checkpoint.safetensors_io import ShardWriter, read_header_bytes, write_index
from .distributed import Dist, DropPartial, PeerFailed, assign
from .errors import MxptqError, ResumableError
from .outdir import (
    OutputLock,
    Prepared,
    drop_state,
    move_into_place,
    prepare_output,
    save_record,
)
from .plan import Item, Plan
from .skeleton import load_skeleton
from .source import side_files
from .tensor import QuantizedTensor, dequantize, quantize_tensor, search_global_norm

_FLOATS = {"F32", "BF16", "F16", "F64"}
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
    side: tuple[list, list[str]] | None = None  # source.side_files(model), if already listed
    on_note: Callable[[str], None] | None = None  # one line for the user (resume decisions)
    started: float | None = None  # perf_counter() at the command's start: wall time counts
    # from there (calibration included)


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


def missing_linears(plan: Plan) -> list[str]:
    """Linear layers of the model that the checkpoint holds no weight for (a tied lm_head
    aside): quantizing it would write a checkpoint that loads them randomly initialised."""
    try:
        sk = load_skeleton(plan.model_dir)
    except MxptqError:  # no model to compare with (the plan then stood on names alone)
        return []
    present = {sk.match_linear(it.name[: -len(".weight")]) for it in plan.items
               if it.name.endswith(".weight")}
    return sorted(sk.linears - present - sk.lm_head)


def fingerprints(plan: Plan) -> dict[str, tuple[int, int, str]]:
    """(size, mtime_ns, SHA-256 of the header) of every input shard: what --resume compares to
    tell changed input. Hashing every input byte would cost a full extra read (or CPU in the
    reader) per run; a content change that keeps size and modification time (and the header)
    is the one this does not see (docs/reliability.md)."""
    out = {}
    for p in plan.shards:
        st = os.stat(p)
        raw, _ = read_header_bytes(p)
        out[p.name] = (st.st_size, st.st_mtime_ns, hashlib.sha256(raw).hexdigest())
    return out


def signature(plan: Plan, flags: dict, prints: dict) -> str:
    """What must be equal for --resume to continue a run: flags, the plan, the input shards'
    fingerprints and config.json."""
    h = hashlib.sha256(json.dumps(flags, sort_keys=True, default=str).encode())
    for it in plan.items:
        h.update(f"{it.name}|{it.info.shard}|{it.info.dtype}|{it.info.shape}|{it.action}".encode())
    h.update(json.dumps(sorted(prints.items())).encode())
    h.update((plan.model_dir / "config.json").read_bytes())
    return h.hexdigest()


class Quantizer:
    """Quantize the items of a bundle on the device; returns output tensors and statistics."""

    def __init__(self, plan: Plan, device: torch.device, calib: CalibData | None = None,
                 global_search: bool = False):
        self.plan, self.device, self.backend = plan, device, _backend(device)
        self.calib = calib or CalibData()
        self.global_search = global_search and plan.fmt.has_global

    def _importance(self, module: str) -> torch.Tensor | None:
        imp = self.calib.importance.get(module)
        return None if imp is None else imp.to(self.device)

    def _norm(self, ws: list[torch.Tensor], modules: list[str], amax) -> float | None:
        """--global-search: the global_norm of tensors that share one global scale, searched
        on their RTN error (None: the selector's default, also when GPTQ chose the bytes)."""
        if not self.global_search or any(self._gptq([m]) is not None for m in modules):
            return None
        try:
            return search_global_norm(ws, self.plan.fmt, self.plan.scale,
                                      importances=[self._importance(m) for m in modules],
                                      global_amax=amax)
        except ValueError as e:
            raise MxptqError(f"tensor {modules[0]}: {e}") from e

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

    def _one(self, w: torch.Tensor, name: str, modules: list[str], amax,
             norm: float | None = None) -> tuple:
        """RTN (importance-weighted when calibration gave one) unless GPTQ already chose the
        bytes; the error is measured against the original weight either way."""
        module = modules[0]
        qt = self._gptq(modules)
        if qt is None:
            try:
                qt = quantize_tensor(
                    w, self.plan.fmt, self.plan.scale, importance=self._importance(module),
                    global_amax=amax, backend=self.backend, global_norm=norm,
                )
            except ValueError as e:
                raise MxptqError(f"tensor {name}: {e}") from e
        # scaled to |w| <= 1 first, so that the squares cannot overflow fp32 (a weight of 3e38)
        m = w.float().abs().amax().clamp_min(1e-30)
        wf, dq = w.float() / m, dequantize(qt).to(w.device) / m
        den = float((wf * wf).sum())
        err = float(((wf - dq) ** 2).sum())
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
        dense = [(it, w) for it, w in zip(b.items, dev, strict=True) if it.layout is None]
        # A fused set split over shards keeps the default: its partners are not here to search
        norm = None
        if dense and b.partner_amax is None:
            norm = self._norm([w for _, w in dense], [it.modules[0] for it, _ in dense], amax)
        for it, w in zip(b.items, dev, strict=True):
            if it.layout is None:
                qt, err, den = self._one(w, it.name, it.modules[:1], amax, norm)
                out.update(self._write(it.modules[0], qt))
            else:
                err = den = 0.0
                for e in range(w.shape[0]):
                    we = w[e] if it.layout == "out_in" else w[e].t().contiguous()
                    # gate and up of one expert share its input, hence the first's importance
                    mods = it.modules[e * it.split : (e + 1) * it.split]
                    e_norm = self._norm([we], mods[:1], None)
                    qt, e_err, e_den = self._one(we, f"{it.name}[{e}]", mods, None, e_norm)
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


def _open_input(path: Path, prints: dict) -> int:
    """Open an input shard read-only, refusing one that changed since the plan was made."""
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    size, mtime, _ = prints[path.name]
    if (st.st_size, st.st_mtime_ns) != (size, mtime):
        os.close(fd)
        raise MxptqError(f"{path}: changed while this run was using it (size or modification "
                         "time); rerun once the model folder is stable")
    return fd


def _read_dense(plan: Plan, fd: int, item: Item, device: torch.device) -> torch.Tensor:
    """A tensor kept dense (decoded to the model's dtype when the source stores it quantized);
    NaN is refused here as it is in quantized ones (an Inf may be a mask's -inf, so it
    passes)."""
    t = plan.source.read(fd, item.info, False, device, True)
    if item.info.dtype in _FLOATS and t.numel() and bool(torch.isnan(t).any()):
        raise MxptqError(f"tensor {item.name} (kept dense: {item.reason}): "
                         f"{int(torch.isnan(t).sum())} NaN values")
    return t


def _reader(plan: Plan, shards: list[Path], q: queue.Queue, stop: threading.Event,
            pin: bool, prints: dict, device: torch.device) -> None:
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
            fd = _open_input(shard, prints)
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
                            pfd = _open_input(plan.model_dir / m.info.shard, prints)
                            try:
                                a = float(plan.source.read(pfd, m.info, device=device)
                                          .abs().amax().float())
                            finally:
                                os.close(pfd)
                            amax = a if amax is None else max(amax, a)
                done.update(m.name for m in members)
                on_gpu = pin and it.action == "quantize"
                futs = [pool.submit(_read_dense, plan, fd, m, device) if m.action == "keep"
                        else pool.submit(plan.source.read, fd, m.info, on_gpu, device)
                        for m in members]
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
    records each finished shard (fsynced, renamed, then its checksummed record written)."""

    def __init__(self, plan: Plan, tmp: Path, names: dict[str, str]):
        super().__init__(daemon=True)
        self.plan, self.tmp, self.names = plan, tmp, names
        self.records: dict[str, dict] = {}
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
                    rec = w.close()
                    w = None
                    fsync_dir(self.tmp)
                    rec.update(stats=msg[2], seconds=msg[3])
                    save_record(self.tmp, msg[1], rec)
                    self.records[msg[1]] = rec
                    event("shard-recorded")
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


def _resumable(e: OSError, tmp: Path) -> ResumableError:
    where = f"{e.filename}: " if e.filename else ""
    return ResumableError(f"{where}{e.strerror or e}; finished shards are kept in {tmp}: rerun "
                          "with --resume once the cause is fixed")


@dataclass
class Start:
    """How a run starts, decided before any heavy work (calibration included)."""

    prep: Prepared
    sig: str
    prints: dict
    names: dict[str, str]


def start(plan: Plan, opts: RunOptions) -> Start:
    """Decide under the --out lock (the caller holds OutputLock(opts.out) until `run` returns):
    refuse, start afresh, resume from the checked finished shards, or report the output
    already finished."""
    names = output_shard_names(plan)
    try:
        prints = fingerprints(plan)
        sig = signature(plan, opts.flags, prints)
        prep = prepare_output(opts.out, opts.overwrite, opts.resume, sig, names)
    except OSError as e:
        raise MxptqError(f"{e.filename or opts.out}: {e.strerror or e}") from e
    except ValueError as e:  # an input header that changed since the plan read it
        raise MxptqError(f"input changed while planning ({e})") from e
    for note in prep.notes:
        if opts.on_note:
            opts.on_note(note)
    return Start(prep, sig, prints, names)


def start_shared(plan: Plan, opts: RunOptions, dist: Dist | None) -> Start:
    """`start` on rank 0 (which holds the --out lock), the same decision on every rank."""
    if dist is None:
        return start(plan, opts)
    return dist.share("start", lambda: start(plan, opts))


def my_shards(plan: Plan, todo: list[Path], dist: Dist | None) -> list[Path]:
    """The shards of `todo` this rank writes: split over the ranks balanced by input bytes."""
    if dist is None:
        return todo
    by_shard = plan.by_shard()
    sizes = [sum(plan.source.nbytes(it.info) for it in by_shard.get(s.name, [])) for s in todo]
    return [todo[i] for i in assign(sizes, dist.world)[dist.rank]]


def run(
    plan: Plan,
    opts: RunOptions,
    on_progress: Callable[[int, int], None] | None = None,
    begun: Start | None = None,
    dist: Dist | None = None,
) -> dict:
    """Quantize the whole plan into opts.out; returns the report dict. Holds the --out lock
    for the whole run; `begun` is what `start` decided, if the caller called it (holding the
    lock since). With `dist`, this rank writes its share of the shards, and rank 0 (the only
    one holding the lock) writes index, config and report once every rank finished; other
    ranks return an empty dict."""
    t0 = time.perf_counter() if opts.started is None else opts.started
    device = resolve_device(opts.device)
    if dist is not None:
        device = dist.device(device)
    main = dist is None or dist.main
    side, _ = opts.side if opts.side is not None else side_files(plan.model_dir)
    with OutputLock(opts.out) if main else contextlib.nullcontext():
        b = begun or start_shared(plan, opts, dist)
        prep, tmp = b.prep, b.prep.tmp
        try:
            if prep.finished or prep.complete:
                if not main:
                    return {}
                if prep.complete:
                    move_into_place(tmp, opts.out)
                if opts.on_note:
                    opts.on_note(f"{opts.out} holds this checkpoint (same flags and input): "
                                 "nothing left to do")
                with contextlib.suppress(OSError, ValueError):
                    return json.loads((opts.out / REPORT_NAME).read_text())
                return {}
            todo = my_shards(plan, [s for s in plan.shards if s.name not in prep.done], dist)
            if dist is None:
                records = _stream(plan, opts, device, tmp, b.names, todo, b.prints, on_progress)
            else:
                tick = dist.ticker()
                with dist.show_progress(on_progress):
                    records = _stream(plan, opts, device, tmp, b.names, todo, b.prints, tick)
                    tick.flush()
                    parts = dist.gather("records", records)
                if not main:
                    dist.share("finalized", lambda: None)  # wait for rank 0's finalize
                    return {}
                for p in parts:
                    records.update(p)
            records.update(prep.done)
            report = finalize(plan, opts, tmp, b.names, records, time.perf_counter() - t0,
                              device, side, b.sig)
            if dist is not None:
                dist.share("finalized", lambda: True)
            return report
        except OSError as e:
            raise _resumable(e, tmp) from e
        except MxptqError as e:
            if isinstance(e, ResumableError):
                raise
            if dist is not None:  # rank 0 removes the folder once every rank stopped
                if isinstance(e, DropPartial | PeerFailed):
                    raise
                raise DropPartial(str(e)) from e
            shutil.rmtree(tmp, ignore_errors=True)  # bad input: a resume would fail the same
            raise


def _stream(plan, opts, device, tmp, names, todo, prints, on_progress) -> dict[str, dict]:
    """Read, quantize and write the shards in `todo`; returns their records."""
    quant = Quantizer(plan, device, opts.calib, bool(opts.flags.get("global-search")))
    q: queue.Queue = queue.Queue(maxsize=_PREFETCH_BUNDLES)
    stop = threading.Event()
    pin = device.type == "cuda"
    reader = threading.Thread(target=_reader, args=(plan, todo, q, stop, pin, prints, device),
                              daemon=True)
    writer = _Writer(plan, tmp, names)
    reader.start()
    writer.start()
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
    except BaseException:
        stop.set()
        while reader.is_alive():
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.1)
        writer.stop()
        raise
    writer.stop()
    return writer.records


def finalize(plan, opts, tmp, names, records, seconds, device, side, sig) -> dict:
    """Index, config, copied files, report and manifest, each written atomically; then the
    resume state is dropped and the folder moved into place."""
    event("finalize-start")
    weight_map = {}
    for it in plan.items:
        for n in plan.output_specs(it):
            weight_map[n] = names[it.info.shard]
    total = sum(v["size"] for v in records.values())
    write_index(tmp, weight_map, total)
    for rel, src in side:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        copy_atomic(src, tmp / rel)
    config = json.loads((plan.model_dir / "config.json").read_text())
    config["quantization_config"] = plan.dialect.config(
        plan.fmt, plan.scale, plan.ignore, plan.w4a4, plan.targets
    )
    write_atomic(tmp / "config.json",
                 (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    for fname, content in plan.dialect.extra_files(plan.fmt, plan.ignore, plan.w4a4).items():
        write_atomic(tmp / fname, (json.dumps(content, indent=2) + "\n").encode())
    ordered = [records[s.name] for s in plan.shards]
    stats = [s for r in ordered for s in r["stats"]]
    calib = opts.calib.summary if opts.calib else None
    timings = {r["file"]: r["seconds"] for r in ordered}
    report = write_report(tmp, plan, opts.flags, stats, timings, seconds, str(device),
                          __version__, calib)
    for d in sorted({(tmp / rel).parent for rel, _ in side}):
        fsync_dir(d)
    write_manifest(tmp, sig, ordered)
    drop_state(tmp)
    event("finalize-state-dropped")
    move_into_place(tmp, opts.out)
    return report
