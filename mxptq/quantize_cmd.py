"""`mxptq quantize`: resolve options, plan, print the plan, run the pipeline, summarize."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
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

from .checkpoint.dialects import default_dialect, get_dialect
from .errors import MxptqError
from .formats import FORMATS, get_format
from .pipeline import CalibData, RunOptions, partial_dir, resolve_device, run
from .plan import Plan, build_plan
from .recipes import load_recipe, merge
from .scales import SELECTORS
from .source import resolve_model

CALIB_KEYS = ("calib", "calib-samples", "calib-seqlen", "seed", "importance", "algo",
              "gptq-scales", "damp", "act-order", "scheme")
_CHOICES = {"algo": ("rtn", "gptq"), "gptq-scales": ("lazy", "static"),
            "scheme": ("w4a16", "w4a4")}


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
    opts["dialect"] = opts["dialect"] or default_dialect(fmt)
    get_dialect(opts["dialect"]).check(fmt)
    try:
        from .scales import resolve_selector

        resolve_selector(fmt, opts["scale"])
    except ValueError as e:
        raise MxptqError(f"--scale {opts['scale']} with --format {fmt.name}: {e}") from e
    check_calibration(opts)
    return opts


def check_calibration(opts: dict) -> None:
    """The calibration flags, before any heavy work: each one that uses calibration needs
    --calib, and --calib alone would calibrate for nothing."""
    for key, choices in _CHOICES.items():
        if opts[key] not in choices:
            raise MxptqError(f"unknown --{key} {opts[key]!r} (one of {', '.join(choices)})")
    uses = [f for f, on in (("--importance", opts["importance"]),
                            ("--algo gptq", opts["algo"] == "gptq"),
                            ("--scheme w4a4", opts["scheme"] == "w4a4")) if on]
    if uses and not opts["calib"]:
        raise MxptqError(f"{' and '.join(uses)} need(s) --calib SOURCE (calibration text)")
    if opts["calib"] and not uses:
        raise MxptqError("--calib is used only with --importance, --algo gptq or --scheme w4a4")
    if int(opts["calib-samples"]) < 1 or int(opts["calib-seqlen"]) < 2:
        raise MxptqError("--calib-samples must be at least 1 and --calib-seqlen at least 2")
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
    """Calibration runs the model class on the source's stored weights: both must be there."""
    if not opts["calib"]:
        return
    if plan.name_based:
        raise MxptqError(f"--calib needs the model class, and {plan.names_reason}; "
                         "quantize without calibration flags (RTN)")
    if plan.source.name != "dense":
        raise MxptqError(f"--calib reads dense weights, and the source stores "
                         f"{plan.source.describe}; quantize without calibration flags (RTN)")


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
        t.add_row("dense Linear layers", f"{len(s['ignore'])}: {shown}")
    return t


def summary_table(report: dict, out: Path) -> Table:
    t = Table(title=f"wrote {out}")
    t.add_column("what")
    t.add_column("value", justify="right")
    e = report["error"]
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


def quantize_main(cli: dict, recipe: Path | None, dry_run: bool, overwrite: bool, resume: bool,
                  as_json: bool) -> None:
    """Everything after argument parsing; raises MxptqError for the user's mistakes."""
    console = Console(stderr=as_json)
    opts = resolve_options(cli, recipe)
    out = Path(opts["out"]).expanduser().resolve()
    model_dir = resolve_model(str(opts["model"]))
    if model_dir == out or model_dir in out.parents:
        raise MxptqError(f"--out {out}: must not be the input folder or inside it")
    plan = build_plan(
        model_dir, opts["fmt"], opts["scale"], get_dialect(opts["dialect"]),
        opts["ignore"], bool(opts["quantize-lm-head"]), opts["scheme"] == "w4a4",
        fused_sets(opts["fused-set"]),
    )
    check_calibration_source(plan, opts)
    console.print(plan_table(plan))
    if plan.name_based:
        console.print(f"note: the plan comes from tensor names: {plan.names_reason} "
                      "(docs/quantize.md, \"Name-based plan\")")
        console.print(name_table(plan))
    if dry_run:
        if as_json:
            print(json.dumps({"plan": plan.summary()}, indent=2))
        return
    flags = {k: opts[k] for k in ("format", "scale", "block-size", "dialect", "ignore",
                                  "quantize-lm-head", "device", "fused-set", *CALIB_KEYS)}
    flags["model"] = str(opts["model"])
    if opts["calib"] and Path(opts["calib"]).is_file():  # --resume must see the same text
        flags["calib-sha256"] = _file_sha256(Path(opts["calib"]))
    calib = None
    if opts["calib"]:
        calib = run_calibration(plan, opts)
        for note in calib.summary["notes"]:
            console.print(f"note: {note}")
    ropts = RunOptions(out, opts["device"], overwrite, resume, flags, calib)
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

        try:
            report = run(plan, ropts, on_progress)
        except MxptqError:
            raise
        except KeyboardInterrupt as e:
            raise MxptqError(
                f"interrupted; finished shards are kept in {partial_dir(out)}: rerun with --resume"
            ) from e
    console.print(summary_table(report, out))
    if as_json:
        print(json.dumps({"plan": plan.summary(), "out": str(out), "error": report["error"],
                          "timings": report["timings"]}, indent=2))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fill_empty_amax(stats: dict) -> None:
    """An expert that saw no token has input amax 0 (an infinite activation scale): it takes
    the largest amax of the same projection of its sibling experts."""
    key = {n: re.sub(r"\.experts\.\d+\.", ".experts.*.", n) for n in stats}
    best: dict[str, float] = {}
    for n, s in stats.items():
        best[key[n]] = max(best.get(key[n], 0.0), s.amax)
    for n, s in stats.items():
        if s.amax == 0:
            s.amax = best[key[n]]


def run_calibration(plan: Plan, opts: dict) -> CalibData:
    """Calibrate once before streaming: per-Linear input statistics (importance, W4A4 amax)
    and, with --algo gptq, the GPTQ result of every Linear and expert the plan quantizes, held in
    host memory until its shard is written."""
    from transformers import AutoTokenizer

    from .calibration import (
        CalibOptions,
        activation_scales,
        calibrate,
        fused_groups,
        load_calibration,
        model_names,
        quantize_layer,
    )

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(plan.model_dir)
    ids = load_calibration(opts["calib"], tok, int(opts["calib-samples"]),
                           int(opts["calib-seqlen"]), int(opts["seed"]))
    planned = [m for it in plan.items if it.action == "quantize" for m in it.modules]
    gptq = opts["algo"] == "gptq"
    copts = CalibOptions(
        format=opts["format"], scale=opts["scale"], block_size=opts["block-size"],
        importance=bool(opts["importance"]), algo=opts["algo"],
        gptq_scales=opts["gptq-scales"], damp=float(opts["damp"]),
        act_order=bool(opts["act-order"]),
    )
    data = CalibData()
    stats: dict = {}
    to_ckpt = model_names(planned)  # the model's module names -> the plan's

    def on_layer(run) -> None:
        if gptq:
            done = quantize_layer(run, copts, set(to_ckpt))
            data.gptq.update({to_ckpt[n]: qt.to("cpu") for n, qt in done.items()})
        for n, st in run.stats.items():
            st.xtx = None  # the Hessian is used up; keep E[x²] and amax only
            stats[to_ckpt.get(n, n)] = st.to("cpu")

    calibrate(plan.model_dir, ids, device=resolve_device(opts["device"]), hessian=gptq,
              on_layer=on_layer, sequential=gptq, keep_stats=False)
    stats = {m: stats[m] for m in planned if m in stats}
    if opts["importance"]:
        data.importance = {m: s.second_moment() for m, s in stats.items() if s.tokens}
    notes = _notes(planned, stats, data, opts)
    if opts["scheme"] == "w4a4":
        _fill_empty_amax(stats)
        data.acts = activation_scales(stats, fused_groups(list(stats)))
    data.summary = {
        "tokens": int(ids.numel()), "windows": list(ids.shape), "linears": len(stats),
        "empty": sorted(m for m, s in stats.items() if s.tokens == 0),
        "gptq": len(data.gptq), "notes": notes, "seconds": time.perf_counter() - t0,
    }
    return data


def _notes(planned: list[str], stats: dict, data: CalibData, opts: dict) -> list[str]:
    """What calibration could not cover; a W4A4 Linear without statistics is an error."""
    missing = [m for m in planned if m not in stats]
    if missing and opts["scheme"] == "w4a4":
        raise MxptqError(
            f"--scheme w4a4: {missing[0]} got no calibration statistics (it is outside the "
            "decoder layers); keep it dense with --ignore or --keep-lm-head"
        )
    notes = []
    empty = [m for m in planned if m not in data.importance]
    if opts["importance"] and empty:
        notes.append(f"{len(empty)} quantized Linears saw no calibration token (unrouted "
                     f"experts, or outside the decoder layers, e.g. {empty[0]}): plain RTN")
    if opts["algo"] == "gptq":
        rtn = [m for m in planned if m not in data.gptq]
        if rtn:
            notes.append(f"{len(rtn)} quantized Linears without statistics (e.g. {rtn[0]}) "
                         "use RTN instead of GPTQ")
    return notes


def fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def guarded(fn, *args) -> None:
    """One line per failure: MxptqError is the user's; anything else is ours (traceback with
    MXPTQ_DEBUG=1)."""
    try:
        fn(*args)
    except MxptqError as e:
        fail(str(e))
    except Exception as e:
        if os.environ.get("MXPTQ_DEBUG"):
            raise
        out = args[0].get("out") if args and isinstance(args[0], dict) else None
        hint = f"; finished shards are kept for --resume next to {out}" if out else ""
        fail(f"internal error: {type(e).__name__}: {e}{hint} (MXPTQ_DEBUG=1 shows a traceback)", 1)
