"""Launching a kernel whose tile is already chosen, without Triton's per-call machinery.

Triton's JIT launcher re-derives the specialization of every call (each argument's type,
16-byte alignment and value class, hashed into a cache key) and its autotuner adds its own key
and dictionary merges: 86 to 100 us of host time a call on an H200 machine's host
(docs/runtime.md), several times what a decode-sized GEMV takes on the GPU. A `Launcher` does
that work once. It holds one compiled specialization, its grid, and every argument except the
few that change from call to call (which lead the kernel's parameter list: x, out, ...), and
hands them to the compiled kernel's own launcher (`CompiledKernel.run(grid..., stream,
function, packed_metadata, launch_metadata, enter_hook, exit_hook, *all_arguments)`, the call
`JITFunction.run` ends with in Triton 3.3 to 3.9; read in triton/runtime/jit.py of 3.6 and
3.9).

Whoever keeps a Launcher must key it on everything that decides the specialization of the
per-call arguments: their dtypes, their 16-byte alignment and the shape-derived integers
(M, strides). The per-call pointers must also keep the dtype the kernel was compiled for when
the JIT path runs (`views`).

Without a compiled kernel (the interpreter), while Triton's launch hooks are set (a profiler),
or once a check found the direct launch differing from the JIT's, a Launcher launches through
the JIT with the same fixed arguments, so results never depend on the route.
"""

from __future__ import annotations

import warnings

import torch
import triton

from .fp4_codes import INTERPRET

try:  # Triton >= 3.3: launch hooks live in knobs
    from triton import knobs as _knobs

    _RUNTIME = _knobs.runtime
except ImportError:  # older Triton: the direct launch is not attempted
    _RUNTIME = None

_state = {"direct": _RUNTIME is not None and not INTERPRET}


def direct_launch_enabled() -> bool:
    """Whether Launchers may call compiled kernels directly (off in the interpreter, with an
    old Triton, or after a failed check)."""
    return _state["direct"]


def _hooked() -> bool:
    """Whether a launch hook (e.g. a profiler's) is registered: such launches take the JIT."""
    h = _RUNTIME.launch_enter_hook
    return h is not None and bool(getattr(h, "calls", True))


def bench_graph(kernel_call, quantiles):
    """Autotune on GPU time: replaying a CUDA graph keeps Python launch cost out of the choice
    (skinny calls take less GPU time than their launch takes on the host)."""
    return triton.testing.do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)


class Launcher:
    """One compiled specialization of a @triton.jit kernel with its grid, launch options and
    every argument after the per-call ones, launched by `launcher(stream, *per_call)`."""

    __slots__ = ("kernel", "grid", "static", "options", "views", "_run", "_fn", "_meta")

    def __init__(self, kernel, grid: tuple, static: tuple, options: dict, views: tuple, compiled):
        self.kernel, self.static, self.options, self.views = kernel, static, options, views
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self._run = self._fn = self._meta = None
        if compiled is not None and direct_launch_enabled():
            if hasattr(compiled, "result"):  # an asynchronous compile's future
                compiled = compiled.result()
            run = getattr(compiled, "run", None)
            fn = getattr(compiled, "function", None)
            meta = getattr(compiled, "packed_metadata", None)
            if run is not None and fn is not None and meta is not None:
                self._run, self._fn, self._meta = run, fn, meta

    @property
    def direct(self) -> bool:
        return self._run is not None

    def __call__(self, stream: int, *dyn) -> None:
        if self._run is not None and not _hooked():
            g = self.grid
            self._run(
                g[0], g[1], g[2], stream, self._fn, self._meta, None, None, None, *dyn, *self.static
            )
        else:
            self.jit(*dyn)

    def jit(self, *dyn) -> None:
        """The same launch through Triton's JIT (the per-call tensors viewed as compiled)."""
        dyn = tuple(d if v is None else d.view(v) for d, v in zip(dyn, self.views, strict=True))
        self.kernel[self.grid](*dyn, *self.static, **self.options)

    def disable(self) -> None:
        self._run = None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN outputs of garbage weights compare equal to themselves)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def check_direct(launcher: Launcher, stream: int, dyn: tuple, ref: torch.Tensor) -> None:
    """Run `launcher` directly on the per-call tensors `dyn` (the output second, as in every
    kernel here) and compare that output bit for bit with `ref`, the JIT's result for the same
    arguments. A difference or an error turns the direct launch off for the process (with a
    warning): results never depend on the route."""
    if not launcher.direct:
        return
    try:
        launcher(stream, *dyn)
        same = _same_bits(dyn[1], ref)
    except Exception as e:  # a launcher of another signature: fall back to the JIT
        same, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "its output differs from the JIT launch's"
    if not same:
        _state["direct"] = False
        launcher.disable()
        warnings.warn(
            f"mxptq: direct Triton launch disabled ({why}); using Triton's JIT launcher "
            "(slower eager calls, same results)",
            RuntimeWarning,
            stacklevel=3,
        )


class Call:
    """One launch of a kernel: the per-call tensors (`dyn`, the kernel's leading parameters,
    already viewed as the kernel reads them; `views` says how to view raw ones), the other
    arguments by name, the grid as a function of all arguments, and either a fixed `tile` (tile
    parameters and launch options) or the `tuner` (Triton autotuner) that picks one."""

    __slots__ = ("kernel", "grid", "dyn", "named", "views", "tile", "tuner")

    def __init__(self, kernel, grid, dyn: tuple, named: dict, views: tuple, tile=None, tuner=None):
        self.kernel, self.grid, self.dyn, self.named = kernel, grid, dyn, named
        self.views, self.tile, self.tuner = views, tile, tuner

    def launch(self):
        """Launch through Triton (autotuning on a new key); returns its compiled kernel, or
        None in the interpreter."""
        if self.tile is not None:
            return self.kernel[self.grid](*self.dyn, **self.named, **self.tile)
        return self.tuner[self.grid](*self.dyn, **self.named)

    def launcher(self, compiled) -> Launcher:
        """A Launcher for the tile just launched (`compiled`: what `launch` returned)."""
        tile = self.tile if self.tile is not None else self.tuner.best_config.all_kwargs()
        names = self.kernel.arg_names
        args = {**self.named, **tile}
        static = tuple(args[n] for n in names[len(self.dyn) :])
        options = {k: v for k, v in tile.items() if k not in names}
        grid = self.grid(args) if callable(self.grid) else self.grid
        return Launcher(self.kernel, grid, static, options, self.views, compiled)
