"""Calibration progress on disk, so an interrupted calibration continues where it stopped.

The folder (`mxptq quantize` puts it inside the run's partial output folder) holds:
- `state.json`: the run's signature and the window shape, written once;
- `ids.safetensors`: the token windows (generated ones are not generated again);
- `layer-NNNNN.safetensors`: what layer N produced for the later steps (its Linears'
  statistics and, with GPTQ, their QuantizedTensors), written once the layer is finished;
- `hidden.safetensors`: the fp32 hidden states entering the next layer, its index in the
  metadata; `complete.json` once every layer is done.
Every file is written to a temporary name, flushed and renamed, and a layer's file is written
before the hidden states that follow it, so whatever the moment of a stop the folder describes
a layer boundary. Resuming from it gives the bytes of an uninterrupted run: the hidden states
are exact, and the windows and per-layer results are the ones the run computed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import MxptqError
from ..formats import get_format
from ..tensor import QuantizedTensor
from .stats import LinearStats

# Hidden states are saved at most this often (seconds; they are large: windows x tokens x
# hidden size x 4 bytes); an interrupt (Ctrl-C) always saves the last finished layer's.
SAVE_EVERY_ENV = "MXPTQ_CALIB_SAVE_EVERY"
SAVE_EVERY_S = 60.0
# Testing hook: "N" raises KeyboardInterrupt at the boundary after layer N-1 (N layers done),
# "N:kill" kills the process there with SIGKILL (after that boundary's state is written).
STOP_ENV = "MXPTQ_CALIB_STOP_AT_LAYER"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={k: str(v) for k, v in metadata.items()})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(path, framework="pt") as f:
        names = list(f.keys())  # noqa: SIM118 (safe_open is no dict)
        return {k: f.get_tensor(k) for k in names}, f.metadata() or {}


# Copies (`_own`): fused partners share one LinearStats and slices of one result, which
# safetensors refuses to store as shared memory.
def _own(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def stats_tensors(stats: dict[str, LinearStats]) -> dict[str, torch.Tensor]:
    """LinearStats without the Hessian (used up by then) as exact tensors."""
    out = {}
    for name, s in stats.items():
        out[f"{name}::tokens"] = torch.tensor(s.tokens, dtype=torch.int64)
        out[f"{name}::amax"] = torch.tensor(s.amax, dtype=torch.float64)
        out[f"{name}::in_features"] = torch.tensor(s.in_features, dtype=torch.int64)
        out[f"{name}::borrowed"] = torch.tensor(s.borrowed, dtype=torch.int64)
        if s.sq_sum is not None:
            out[f"{name}::sq_sum"] = _own(s.sq_sum)
        if s.bxx is not None:
            out[f"{name}::bxx"] = _own(s.bxx)
    return out


def qt_tensors(qts: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, qt in qts.items():
        out[f"{name}::codes"] = _own(qt.codes)
        out[f"{name}::scales"] = _own(qt.scales)
        if qt.global_scale is not None:
            out[f"{name}::global_scale"] = _own(qt.global_scale)
    return out


def _split(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    by: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition("::")
        by.setdefault(name, {})[field] = t
    return by


class CalibState:
    """Reads and writes the calibration state folder of one run."""

    def __init__(self, folder: Path, signature: str, n_layers: int):
        self.folder, self.signature, self.n_layers = Path(folder), signature, n_layers
        self.saved_at = time.monotonic()
        self.saved_boundary = 0
        env = os.environ.get(SAVE_EVERY_ENV)
        self.every = float(env) if env else SAVE_EVERY_S

    # -- reading --------------------------------------------------------------------------
    def resume_point(self) -> int:
        """Layers finished by an earlier run of the same signature (0: start afresh). A folder
        of another run is an error: its layers would not match this run's."""
        meta = self.folder / "state.json"
        if not meta.is_file():
            return 0
        try:
            prev = json.loads(meta.read_text())
        except (OSError, ValueError):
            return 0
        if prev.get("signature") != self.signature or prev.get("layers") != self.n_layers:
            raise MxptqError(
                f"--resume: {self.folder.parent} holds a calibration with other flags or input; "
                "drop --resume"
            )
        if (self.folder / "complete.json").is_file():
            k = self.n_layers
        elif (self.folder / "hidden.safetensors").is_file():
            with safe_open(self.folder / "hidden.safetensors", framework="pt") as f:
                k = int((f.metadata() or {}).get("next_layer", 0))
        else:
            k = 0
        if not all(self._layer_path(i).is_file() for i in range(k)):
            return 0
        self.saved_boundary = k
        return k

    def has_start(self) -> bool:
        """A state was started here (its windows are saved)."""
        return all((self.folder / f).is_file() for f in ("state.json", "ids.safetensors"))

    def load_ids(self) -> torch.Tensor | None:
        path = self.folder / "ids.safetensors"
        return _load(path)[0]["ids"] if path.is_file() else None

    def load_hidden(self) -> torch.Tensor:
        return _load(self.folder / "hidden.safetensors")[0]["hidden"]

    def load_layer(self, i: int, fmt_name: str, block_size: int | None):
        """(stats by name, QuantizedTensors by name) that layer i produced."""
        tensors, _ = _load(self._layer_path(i))
        fmt = get_format(fmt_name, block_size)
        stats, qts = {}, {}
        for name, f in _split(tensors).items():
            if "codes" in f:
                qts[name] = QuantizedTensor(f["codes"], f["scales"], f.get("global_scale"), fmt)
            if "tokens" in f:
                bxx = f.get("bxx")
                stats[name] = LinearStats(int(f["in_features"]), False, int(f["tokens"]),
                                          f.get("sq_sum"), float(f["amax"]),
                                          borrowed=int(f.get("borrowed", 0)),
                                          block=0 if bxx is None else bxx.shape[-1], bxx=bxx)
        return stats, qts

    # -- writing --------------------------------------------------------------------------
    def start(self, ids: torch.Tensor) -> None:
        """A fresh state: the windows and the signature (anything older is dropped)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for p in self.folder.iterdir():
            p.unlink()
        _atomic_save({"ids": ids}, self.folder / "ids.safetensors", {})
        _atomic_json({"signature": self.signature, "layers": self.n_layers,
                      "windows": list(ids.shape)}, self.folder / "state.json")

    def save_layer(self, i: int, stats: dict[str, LinearStats],
                   qts: dict[str, QuantizedTensor]) -> None:
        _atomic_save({**stats_tensors(stats), **qt_tensors(qts)}, self._layer_path(i),
                     {"layer": i})

    def boundary(self, k: int, hidden: torch.Tensor, force: bool = False) -> None:
        """Layers 0..k-1 are finished and `hidden` enters layer k: record it when the last
        save is old enough (always at the end, and when `force`d by an interrupt)."""
        if k > self.saved_boundary:
            if k == self.n_layers:
                _atomic_json({"next_layer": k}, self.folder / "complete.json")
                (self.folder / "hidden.safetensors").unlink(missing_ok=True)
                self.saved_boundary = k
            elif force or time.monotonic() - self.saved_at >= self.every:
                _atomic_save({"hidden": hidden.detach().cpu()},
                             self.folder / "hidden.safetensors", {"next_layer": k})
                self.saved_at, self.saved_boundary = time.monotonic(), k
        if not force:
            _testing_stop(k)

    def _layer_path(self, i: int) -> Path:
        return self.folder / f"layer-{i:05d}.safetensors"


def _testing_stop(k: int) -> None:
    spec = os.environ.get(STOP_ENV, "")
    if not spec:
        return
    at, _, how = spec.partition(":")
    if int(at) == k:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise KeyboardInterrupt
