"""The calibration step of `mxptq quantize`: windows (from text, or written by the model), then
one decoder layer at a time with a progress bar, its results saved at layer boundaries in the
run's partial folder so that `--resume` continues from the last finished layer."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .distributed import Dist, assign
from .errors import MxptqError
from .outdir import CALIB_STATE_DIR
from .pipeline import CalibData, resolve_device
from .plan import Plan

_GENERATE = re.compile(r"^generate(?::(\d+))?$")


def parse_generate(source: str | None) -> tuple[bool, int | None]:
    """`--calib generate[:N]`: (is it, N windows or None for --calib-samples)."""
    m = _GENERATE.match(str(source or ""))
    if not m:
        return False, None
    return True, int(m[1]) if m[1] else None


@dataclass
class CalibRun:
    """Where calibration keeps its state and how it talks to the user."""

    tmp: Path  # the run's partial output folder
    signature: str  # the run's flags and input; a resumed state must carry the same
    resume: bool
    console: Console
    show: bool  # progress bars (a terminal, not --json)


def _bar(run: CalibRun, label: str, unit: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), TaskProgressColumn(),
        TextColumn(f"{{task.completed:,.0f}}/{{task.total:,.0f}} {unit}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=run.console, disable=not run.show,
    )


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()


def calib_window(config, seqlen: int) -> tuple[int, str | None]:
    """The window length to use and a note when the model's context is shorter: a window
    longer than max_position_embeddings would calibrate on positions the model never serves."""
    ctx = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(ctx, int) and 2 <= ctx < seqlen:
        return ctx, (f"--calib-seqlen {seqlen} exceeds the model's context "
                     f"(max_position_embeddings {ctx}): calibration windows are {ctx} tokens")
    return seqlen, None


def _windows(plan: Plan, opts: dict, run: CalibRun, state, seqlen: int, device) -> torch.Tensor:
    """The token windows: generated ones come back from the state on --resume; text is
    tokenized again and must give the windows the state was made with."""
    from .calibration import generate_windows
    from .calibration.generate import load_generator

    n, seed = int(opts["calib-samples"]), int(opts["seed"])
    saved = state.load_ids() if run.resume and state.has_start() else None
    if parse_generate(opts["calib"])[0]:
        if saved is not None:
            return saved
        model = load_generator(plan.model_dir, device)
        with _bar(run, "generate", "tokens") as bar:
            task = bar.add_task("g", total=n * (seqlen - 1))
            try:
                ids = generate_windows(model, n, seqlen, seed,
                                       on_progress=lambda k: bar.advance(task, k))
            except KeyboardInterrupt:
                raise MxptqError("interrupted while the model wrote its calibration windows; "
                                 "nothing was kept: rerun to start again") from None
        del model
        return ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plan.model_dir)
    ids = _text_windows(plan, opts["calib"], tok, n, seqlen, seed)
    if saved is not None and not torch.equal(saved, ids):
        raise MxptqError(f"--resume: {run.tmp} holds a calibration on other windows (the text "
                         "changed); drop --resume")
    return ids


def _text_windows(plan: Plan, source: str, tok, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """Windows of the text. An encoder (not a causal LM) is served whole sentences framed by its
    tokenizer's special tokens, so each of its windows is [CLS] + seqlen - 2 tokens + [SEP]
    when the tokenizer has both; a causal LM's windows are plain runs of text."""
    from transformers import AutoConfig

    from .calibration import load_calibration
    from .calibration.layers import is_causal

    cls, sep = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
    if is_causal(AutoConfig.from_pretrained(plan.model_dir)) or cls is None or sep is None \
            or seqlen < 3:
        return load_calibration(source, tok, n, seqlen, seed)
    body = load_calibration(source, tok, n, seqlen - 2, seed)
    return torch.cat([torch.full((n, 1), cls), body, torch.full((n, 1), sep)], dim=1)


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


def run_calibration(plan: Plan, opts: dict, run: CalibRun, dist: Dist | None = None) -> CalibData:
    """Calibrate once before streaming: per-Linear input statistics (importance, W4A4 amax)
    and, with --algo gptq, the GPTQ result of every Linear and expert the plan quantizes, held in
    host memory until its shard is written. Each finished layer's results and (at most once a
    minute, and on Ctrl-C) the hidden states entering the next layer are saved in the partial
    folder; with --resume a saved state of the same run is continued.

    With `dist`, each layer's batches of windows are spread over the ranks and every rank ends
    the layer with all outputs and the statistics one process makes (calibration/parallel.py);
    GPTQ of each layer is split over the ranks by fused set and expert, and the results are
    exchanged before the next layer runs; rank 0 alone writes the saved state."""
    from transformers import AutoConfig

    from .calibration import (
        CalibOptions,
        activation_scales,
        calibrate,
        fused_groups,
        importance_of,
        model_names,
        quantize_layer,
    )
    from .calibration.parallel import Group
    from .calibration.state import CalibState

    t0 = time.perf_counter()
    device = resolve_device(opts["device"])
    config = AutoConfig.from_pretrained(plan.model_dir)
    n_layers = config.get_text_config().num_hidden_layers
    seqlen, note = calib_window(config, int(opts["calib-seqlen"]))
    notes = [note] if note else []
    if note:
        run.console.print(f"note: {note}")
    state = CalibState(run.tmp / CALIB_STATE_DIR, run.signature, n_layers)
    done = state.resume_point() if run.resume else 0
    lead = dist is None or dist.main

    def windows() -> torch.Tensor:
        ids = _windows(plan, opts, run, state, seqlen, device)
        if done == 0:
            state.start(ids)
        return ids

    ids = windows() if dist is None else dist.share("calib-ids", windows)
    planned = [m for it in plan.items if it.action == "quantize" for m in it.modules]
    gptq = opts["algo"] == "gptq"
    copts = CalibOptions(
        format=opts["format"], scale=opts["scale"], block_size=opts["block-size"],
        importance=opts["importance"], algo=opts["algo"],
        gptq_scales=opts["gptq-scales"], damp=float(opts["damp"]),
        act_order=bool(opts["act-order"]), global_search=bool(opts["global-search"]),
    )
    data = CalibData()
    stats: dict = {}
    for i in range(done):
        st, qts = state.load_layer(i, copts.format, copts.block_size)
        stats.update(st)
        data.gptq.update(qts)
    to_ckpt = model_names(planned)  # the model's module names -> the plan's

    def on_layer(lr) -> None:
        qts = {}
        if gptq:
            done_ = (quantize_layer(lr, copts, set(to_ckpt)) if dist is None else
                     _split_layer(lr, copts, set(to_ckpt), dist))
            qts = {to_ckpt[n]: qt.to("cpu") for n, qt in done_.items()}
        layer_stats = {}
        for n, st in lr.stats.items():
            st.xtx = None  # the Hessian is used up; keep E[x²] and amax only
            layer_stats[to_ckpt.get(n, n)] = st.to("cpu")
        if lead:
            state.save_layer(lr.index, layer_stats, qts)
        data.gptq.update(qts)
        stats.update(layer_stats)

    last: list = []  # the last layer boundary reached: (k, hidden states entering layer k)

    def on_boundary(k: int, hidden: torch.Tensor) -> None:
        last[:] = [k, hidden]
        if lead:
            state.boundary(k, hidden)

    if done < n_layers:
        if done:
            run.console.print(f"resuming calibration at layer {done}/{n_layers} from {run.tmp}")
        hidden = state.load_hidden() if done else None
        with _bar(run, "calibrate", "layers") as bar:
            task = bar.add_task("c", total=n_layers, completed=done)
            try:
                calibrate(plan.model_dir, ids, device=device, hessian=gptq,
                          blocks=copts.covariance_block, batch_size=int(opts["calib-batch"]),
                          group=None if dist is None else Group(dist.rank, dist.world),
                          on_layer=on_layer, sequential=gptq, keep_stats=False, start=done,
                          hidden=hidden, on_boundary=on_boundary,
                          on_progress=lambda k, n: bar.update(task, completed=k))
            except KeyboardInterrupt:
                raise _interrupted(state if lead else None, last, done, n_layers, run.tmp,
                                   _generated(opts)) from None
    stats = {m: stats[m] for m in planned if m in stats}
    if copts.importance != "none":
        data.importance = {m: importance_of(s, copts.importance)
                           for m, s in stats.items() if s.tokens}
    notes += _notes(planned, stats, data, opts)
    if opts["scheme"] == "w4a4":
        _fill_empty_amax(stats)
        data.acts = activation_scales(stats, fused_groups(list(stats)))
    for n in notes[1 if note else 0 :]:
        run.console.print(f"note: {n}")
    data.summary = {
        "tokens": int(ids.numel()), "windows": list(ids.shape), "linears": len(stats),
        "source": "generate" if _generated(opts) else "text", "ids_sha256": _ids_digest(ids),
        "empty": sorted(m for m, s in stats.items() if s.own_tokens == 0),
        "pooled": sorted(m for m, s in stats.items() if s.borrowed),
        "gptq": len(data.gptq), "notes": notes, "resumed_at_layer": done,
        "seconds": time.perf_counter() - t0,
    }
    return data


def _split_layer(lr, copts, include: set[str], dist: Dist) -> dict:
    """This rank's share of the layer's GPTQ (fused sets and experts balanced by cost), the
    others' results gathered, and the layer's weights then replaced by all of them."""
    import torch.distributed as tdist

    from .calibration.apply import apply_results, layer_units, quantize_layer

    units = layer_units(lr, copts, include)
    mine = assign([c for _, c in units], dist.world)[dist.rank]
    names = {n for i in mine for n in units[i][0]}
    # the Linears outside every unit (block does not divide them) stay dense, as in one process
    own = quantize_layer(lr, copts, include & names)
    parts: list = [None] * dist.world
    tdist.all_gather_object(parts, {n: _packed(qt) for n, qt in own.items()})
    fmt = next(iter(own.values())).format if own else None
    merged: dict = {}
    for r, part in enumerate(parts):
        if r == dist.rank:
            merged.update(own)
            continue
        got = {n: _unpacked(p, fmt, copts) for n, p in part.items()}
        apply_results(lr, got)
        merged.update(got)
    return merged


def _packed(qt) -> tuple:
    """A QuantizedTensor as plain bytes (torch's object collectives do not carry float8)."""
    g = None if qt.global_scale is None else qt.global_scale.detach().cpu().clone()
    return (qt.codes.detach().cpu().contiguous().clone(),
            qt.scales.detach().cpu().contiguous().view(torch.uint8).clone(),
            str(qt.scales.dtype).removeprefix("torch."), g)


def _unpacked(p: tuple, fmt, copts):
    from .formats import get_format
    from .tensor import QuantizedTensor

    codes, scales, dtype, g = p
    fmt = fmt or get_format(copts.format, copts.block_size)
    return QuantizedTensor(codes, scales.view(getattr(torch, dtype)), g, fmt)


def _generated(opts: dict) -> bool:
    return parse_generate(opts["calib"])[0]


def _interrupted(state, last: list, done: int, n_layers: int, tmp: Path,
                 generated: bool) -> MxptqError:
    """Save the last finished layer's boundary (rank 0 does) and say how to continue."""
    if last and state is not None:
        k, hidden = last
        state.boundary(k, hidden, force=True)
    else:
        k = last[0] if last else done
    if k == 0 and generated:
        return MxptqError("interrupted during calibration before its first layer finished; "
                          f"the generated windows are kept in {tmp}: rerun the same command "
                          "with --resume to calibrate without generating them again")
    if k == 0:
        return MxptqError("interrupted during calibration before its first layer finished; "
                          "nothing to continue from: rerun the same command to start again")
    return MxptqError(f"interrupted during calibration; layers 0-{k - 1} of {n_layers} are kept "
                      f"in {tmp}: rerun the same command with --resume to continue at layer {k}")


def _notes(planned: list[str], stats: dict, data: CalibData, opts: dict) -> list[str]:
    """What calibration could not cover; a W4A4 Linear without statistics is an error."""
    missing = [m for m in planned if m not in stats]
    if missing and opts["scheme"] == "w4a4":
        raise MxptqError(
            f"--scheme w4a4: {missing[0]} got no calibration statistics (it is outside the "
            "transformer layers); keep it dense with --ignore or --keep-lm-head"
        )
    notes = []
    pooled = [m for m, s in stats.items() if s.borrowed]
    if pooled:
        notes.append(f"{len(pooled)} quantized expert Linears saw fewer calibration tokens than "
                     f"their input width (e.g. {pooled[0]}): their statistics are topped up "
                     "with their sibling experts' (docs/calibration.md, \"Starved experts\")")
    empty = [m for m in planned if m not in data.importance]
    if opts["importance"] != "none" and empty:
        notes.append(f"{len(empty)} quantized Linears have no calibration statistics "
                     f"(outside the transformer layers, or experts of a layer that routed no "
                     f"token at all, e.g. {empty[0]}): plain RTN")
    if opts["algo"] == "gptq":
        rtn = [m for m in planned if m not in data.gptq]
        if rtn:
            notes.append(f"{len(rtn)} quantized Linears without statistics (e.g. {rtn[0]}) "
                         "use RTN instead of GPTQ")
    return notes
