"""`mxptq quantize`: resolve options, plan, print the plan, run the pipeline, summarize."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import distributed, interrupts
from .checkpoint.dialects import default_dialect, get_dialect
from .checkpoint.durable import reset_events
from .checkpoint.paths import check_disjoint
from .errors import MxptqError
from .formats import FORMATS, get_format
from .interrupts import RECEIVED
from .outdir import OutputLock, lock_path, old_dir, partial_dir
from .pipeline import RunOptions, missing_linears, run, start_shared
from .plan import Plan, build_plan
from .quantize_calib import CalibRun, parse_generate, run_calibration
from .recipes import load_recipe, merge
from .scales import SELECTORS
from .source import resolve_model, side_files

CALIB_KEYS = ("calib", "calib-samples", "calib-seqlen", "calib-batch", "seed", "importance",
              "algo", "gptq-scales", "damp", "act-order", "scheme")
_CHOICES = {"algo": ("rtn", "gptq"), "gptq-scales": ("lazy", "static"),
            "scheme": ("w4a16", "w4a4"), "importance": ("none", "diag", "hessian")}


def _gib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def resolve_options(cli: dict, recipe: Path | None) -> dict:
    opts = merge(load_recipe(recipe) if recipe else {}, cli)
    if not opts["model"]:
        raise MxptqError("--model is required (a hub id or a local folder)")
    if not opts["out"]:
        raise MxptqError("--out is required")
    if opts["format"] not in FORMATS:
        raise MxptqError(f"unknown --format {opts['format']!r} (one of {', '.join(FORMATS)})")
    if opts["scale"] not in SELECTORS:
        raise MxptqError(f"unknown --scale {opts['scale']!r} (one of {', '.join(SELECTORS)})")
    try:
        fmt = get_format(opts["format"], opts["block-size"])
    except ValueError as e:
        raise MxptqError(f"--block-size: {e}") from e
    opts["fmt"] = fmt
    check_ignore(opts["ignore"])
    opts["dialect"] = opts["dialect"] or default_dialect(fmt)
    get_dialect(opts["dialect"]).check(fmt)
    try:
        from .scales import resolve_selector

        resolve_selector(fmt, opts["scale"])
    except ValueError as e:
        raise MxptqError(f"--scale {opts['scale']} with --format {fmt.name}: {e}") from e
    check_calibration(opts)
    return opts


def check_ignore(patterns) -> None:
    """--ignore patterns: strings, and `re:` ones valid regular expressions."""
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise MxptqError(f"--ignore: expected a list of patterns, got {patterns!r}")
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise MxptqError(f"--ignore {p!r}: not a regular expression ({e})") from e


def check_calibration(opts: dict) -> None:
    """The calibration flags, before any heavy work: each one that uses calibration needs
    --calib, and --calib alone would calibrate for nothing."""
    if isinstance(opts["importance"], bool):  # recipes written before the modes: true = diag
        opts["importance"] = "diag" if opts["importance"] else "none"
    for key, choices in _CHOICES.items():
        if opts[key] not in choices:
            raise MxptqError(f"unknown --{key} {opts[key]!r} (one of {', '.join(choices)})")
    uses = [f for f, on in ((f"--importance {opts['importance']}", opts["importance"] != "none"),
                            ("--algo gptq", opts["algo"] == "gptq"),
                            ("--scheme w4a4", opts["scheme"] == "w4a4")) if on]
    if uses and not opts["calib"]:
        raise MxptqError(f"{' and '.join(uses)} need(s) --calib SOURCE (calibration text)")
    if opts["calib"] and not uses:
        raise MxptqError("--calib is used only with --importance, --algo gptq or --scheme w4a4")
    generate, n = parse_generate(opts["calib"])
    if str(opts["calib"] or "").startswith("generate:") and not generate:
        raise MxptqError(f"--calib {opts['calib']}: expected generate or generate:N (N windows)")
    if n is not None:  # generate:N sets the number of windows
        opts["calib-samples"] = n
    if int(opts["calib-samples"]) < 1 or int(opts["calib-seqlen"]) < 2 \
            or int(opts["calib-batch"]) < 1:
        raise MxptqError("--calib-samples and --calib-batch must be at least 1 and "
                         "--calib-seqlen at least 2")
    if not float(opts["damp"]) > 0:
        raise MxptqError(f"--damp {opts['damp']}: must be positive")
    if opts["scheme"] == "w4a4":
        get_dialect(opts["dialect"]).check_w4a4(opts["fmt"])


def fused_sets(value) -> list[tuple[str, ...]] | None:
    """--fused-set / recipe `fused-set`: each set as "a,b,c" or a list of leaf names; the sets
    given replace the built-in table (None: keep it)."""
    if not value:
        return None
    out = []
    for v in value if isinstance(value, list) else [value]:
        names = v.split(",") if isinstance(v, str) else v
        names = tuple(str(n).strip() for n in names if str(n).strip())
        if len(names) < 2 or any(not re.fullmatch(r"\w+", n) for n in names):
            raise MxptqError(f"--fused-set {v!r}: give two or more module leaf names, e.g. "
                             "q_proj,k_proj,v_proj")
        out.append(names)
    return out


def check_calibration_source(plan: Plan, opts: dict) -> None:
    """Calibration runs the model class on the source's stored weights: both must be there, and
    the class must have a stack of layers calibration can find (refused before any output)."""
    if not opts["calib"]:
        return
    if plan.name_based:
        raise MxptqError(f"--calib needs the model class, and {plan.names_reason}; "
                         "quantize without calibration flags (RTN)")
    if plan.source.name != "dense":
        raise MxptqError(f"--calib reads dense weights, and the source stores "
                         f"{plan.source.describe}; quantize without calibration flags (RTN)")
    from .calibration.layers import check_calibratable

    causal = check_calibratable(plan.model_dir)  # before anything is written
    if parse_generate(opts["calib"])[0] and not causal:
        raise MxptqError("--calib generate needs a causal LM to write its windows, and "
                         f"{plan.model_dir} is not one; pass a calibration text")


def name_table(plan: Plan) -> Table:
    """The name-based plan per pattern, layer and expert indices collapsed."""
    from .name_plan import collapse

    t = Table(title="name-based plan (indices as *)")
    t.add_column("tensor", overflow="fold")
    t.add_column("count", justify="right")
    t.add_column("shape")
    t.add_column("decision")
    for pat, n, shape, what in sorted(collapse(plan.items)):
        t.add_row(pat, str(n), shape, what)
    return t


def plan_table(plan: Plan) -> Table:
    s = plan.summary()
    t = Table(title=f"plan: {plan.model_dir.name} -> {plan.fmt.name} / {plan.scale} / "
              f"{plan.dialect.name} (block {plan.fmt.block_size})")
    t.add_column("what")
    t.add_column("count", justify="right")
    t.add_row("planned from", s["planned_from"])
    t.add_row("source weights", s["source"])
    if s["dropped_source_tensors"]:
        t.add_row("source activation / KV-cache scales dropped", str(s["dropped_source_tensors"]))
    t.add_row("input shards", str(s["shards"]))
    t.add_row("tensors", str(s["tensors"]))
    t.add_row("quantize", str(s["quantize"]))
    t.add_row("fused sets sharing a global scale", str(s["fused_groups"]))
    for reason, n in s["kept_reasons"].items():
        t.add_row(f"keep: {reason}", str(n))
    t.add_row("bytes in", _gib(s["bytes_in"]))
    t.add_row("bytes out (estimate)", _gib(s["bytes_out"]))
    if s["ignore"]:
        shown = ", ".join(s["ignore"][:6]) + (" ..." if len(s["ignore"]) > 6 else "")
        t.add_row("named in ignore (dense)", f"{len(s['ignore'])}: {shown}")
    return t


def summary_table(report: dict, out: Path) -> Table:
    t = Table(title=f"wrote {out}")
    t.add_column("what")
    t.add_column("value", justify="right")
    e = report["quantization_error"]
    t.add_row("quantized tensors", str(e["tensors"]))
    t.add_row("relative MSE mean / max", f"{e['rel_mse_mean']:.3e} / {e['rel_mse_max']:.3e}")
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    t.add_row("checkpoint size", _gib(size))
    t.add_row("wall time", f"{report['timings']['total_s']:.1f} s")
    if report["calibration"]:
        c = report["calibration"]
        t.add_row("calibration", f"{c['tokens']:,} tokens, {c['seconds']:.1f} s")
    t.add_row("device", report["device"])
    return t


class _Terminated(KeyboardInterrupt):
    """SIGTERM, stopped like Ctrl-C: the writer drops its unfinished shard, finished ones stay."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def quantize_main(cli: dict, recipe: Path | None, dry_run: bool, overwrite: bool, resume: bool,
                  as_json: bool) -> None:
    """Everything after argument parsing; raises MxptqError for the user's mistakes."""
    started = time.perf_counter()
    dist = distributed.current()
    lead = dist is None or dist.main
    console = Console(stderr=as_json, quiet=not lead)  # rank 0 speaks for the whole job
    reset_events()
    opts = resolve_options(cli, recipe)
    out = Path(opts["out"]).expanduser().resolve()
    model_dir = resolve_model(str(opts["model"]))
    check_disjoint(model_dir, [out, partial_dir(out), old_dir(out), lock_path(out)])
    plan = build_plan(
        model_dir, opts["fmt"], opts["scale"], get_dialect(opts["dialect"]),
        opts["ignore"], bool(opts["quantize-lm-head"]), opts["scheme"] == "w4a4",
        fused_sets(opts["fused-set"]),
    )
    check_calibration_source(plan, opts)
    missing = missing_linears(plan)
    if missing:
        raise MxptqError(f"{model_dir}: the model has {len(missing)} Linear layers the checkpoint "
                         f"holds no weight for (e.g. {missing[0]}); it is incomplete")
    side = side_files(model_dir)
    console.print(plan_table(plan))
    if plan.name_based:
        console.print(f"note: the plan comes from tensor names: {plan.names_reason} "
                      "(docs/quantize.md, \"Name-based plan\")")
        console.print(name_table(plan))
    for note in side[1]:
        console.print(f"note: {note}")
    if dry_run:
        console.print(f"dry run: nothing was written; without --dry-run this writes {out}")
        if as_json and lead:
            print(json.dumps({"dry_run": True, **_choices(plan, opts), "out": str(out),
                              "plan": plan.summary()}, indent=2))
        return
    flags = {k: opts[k] for k in ("format", "scale", "block-size", "dialect", "ignore",
                                  "quantize-lm-head", "device", "fused-set", "global-search",
                                  *CALIB_KEYS)}
    flags["model"] = str(opts["model"])
    if opts["calib"] and Path(opts["calib"]).is_file():  # --resume must see the same text
        flags["calib-sha256"] = _file_sha256(Path(opts["calib"]))
    ropts = RunOptions(out, opts["device"], overwrite, resume, flags, side=side,
                       on_note=lambda note: console.print(f"note: {note}"), started=started)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    interrupts.writing()
    try:
        with OutputLock(out) if lead else contextlib.nullcontext():
            begun = start_shared(plan, ropts, dist)
            if opts["calib"] and not (begun.prep.finished or begun.prep.complete):
                # all shards done but not finalized: the saved calibration is reloaded (cheap)
                # for the report
                show = not as_json and console.is_terminal
                ropts.calib = _calibrate(plan, opts, CalibRun(begun.prep.tmp, begun.sig, resume,
                                                              console, show), dist)
            report = _run(plan, ropts, begun, console, as_json, dist)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    if begun.prep.finished or "quantization_error" not in report or not lead:
        return
    console.print(summary_table(report, out))
    if as_json:
        print(json.dumps({"dry_run": False, **_choices(plan, opts), "out": str(out),
                          "plan": plan.summary(),
                          "quantization_error": report["quantization_error"],
                          "timings": report["timings"]}, indent=2))


def _calibrate(plan: Plan, opts: dict, run: CalibRun, dist: distributed.Dist | None):
    """Calibration on every rank: each runs the layers on all windows, and GPTQ's work is
    split between them layer by layer (quantize_calib); rank 0 alone saves the state and shows
    the bar."""
    if dist is not None and not dist.main:
        run = CalibRun(run.tmp, run.signature, run.resume, run.console, False)
    return run_calibration(plan, opts, run, dist)


def _run(plan: Plan, ropts: RunOptions, begun, console: Console, as_json: bool,
         dist: distributed.Dist | None) -> dict:
    """The pipeline under a progress bar (rank 0's shows the whole job)."""
    total = plan.summary()
    with Progress(
        TextColumn("[bold]quantize"), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[tensors]}"), DownloadColumn(binary_units=True),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=as_json or not console.is_terminal,
    ) as progress:
        task = progress.add_task("q", total=total["bytes_in"], tensors=f"0/{total['tensors']}")
        seen = [0]

        def on_progress(n_tensors: int, n_bytes: int) -> None:
            seen[0] += n_tensors
            progress.update(task, advance=n_bytes, tensors=f"{seen[0]}/{total['tensors']} tensors")

        return run(plan, ropts, on_progress, begun, dist)


def _choices(plan: Plan, opts: dict) -> dict:
    """What was chosen, defaults resolved: the head of `--json` output (a dry run's too)."""
    return {"model": str(plan.model_dir), "format": plan.fmt.name,
            "block_size": plan.fmt.block_size, "scale": plan.scale,
            "dialect": plan.dialect.name, "scheme": opts["scheme"], "algo": opts["algo"]}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def guarded(fn, *args):
    """One line per failure: MxptqError is the user's (exit 2); Ctrl-C and SIGTERM stop with
    one line (exit 130 / 143); anything else is ours (exit 1, traceback with MXPTQ_DEBUG=1).
    Under torchrun the first rank's failure stops every rank; rank 0 prints its line."""
    out = args[0].get("out") if args and isinstance(args[0], dict) else None
    part = partial_dir(Path(out).expanduser().resolve()) if out else None
    dist = distributed.from_env()
    try:
        result = fn(*args)
        interrupts.written()  # inside the try: a Ctrl-C before it still gets its line here
    except BaseException as e:
        if isinstance(e, SystemExit) and (dist is None or not e.code):
            raise
        msg, code = _outcome(e, part)
        if dist is None:
            fail(msg, code)
        peer = isinstance(e, distributed.PeerFailed)
        code = dist.stop(msg, code, isinstance(e, distributed.DropPartial), part, not peer)
        # at once: an interpreter shutting down puts SIGTERM's default back, and torchrun
        # sends one to every rank still running once the first has exited
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if dist is not None:
        dist.close()
    return result


def _outcome(e: BaseException, part: Path | None) -> tuple[str, int]:
    """The error line and exit status of what stopped the run."""
    if isinstance(e, distributed.PeerFailed):
        return str(e), e.code
    if isinstance(e, MxptqError):
        return str(e), 2
    if isinstance(e, KeyboardInterrupt):
        term = isinstance(e, _Terminated)
        kept = (f"; finished shards are kept in {part}: rerun with --resume"
                if part is not None and part.is_dir() else "")
        return f"interrupted ({'SIGTERM' if term else 'Ctrl-C'}){kept}", 143 if term else 130
    if isinstance(e, SystemExit):
        return f"exited with status {e.code}", e.code if isinstance(e.code, int) else 1
    if not isinstance(e, Exception):
        raise e
    if RECEIVED:  # a Ctrl-C swallowed by a library resurfaced as this
        return "interrupted (Ctrl-C)", 130
    if os.environ.get("MXPTQ_DEBUG"):
        raise e
    kept = (f"; finished shards are kept in {part} for --resume"
            if part is not None and part.is_dir() else "")
    return (f"internal error: {type(e).__name__}: {e}{kept} (MXPTQ_DEBUG=1 shows a "
            "traceback)", 1)
