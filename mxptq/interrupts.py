"""How Ctrl-C stops the command line.

Before a command writes anything (start-up: torch, transformers and their native extensions
importing; planning), Ctrl-C prints one line and ends the process at once: an exception raised
into an import can crash native code (pybind11 aborts on it) or be swallowed by a library and
resurface later as some other error. From the moment a command starts writing, Ctrl-C raises
KeyboardInterrupt instead, so the pipeline can drop its unfinished shard and keep the finished
ones for --resume; the signal is recorded, so an error a library made of it still reads as
the interruption it is. Once the writing is over, Ctrl-C ends the process at once again.
Only `python -m mxptq` / the `mxptq` script installs these handlers; in-process callers keep
Python's default.
"""

from __future__ import annotations

import os
import signal
import threading

RECEIVED: list[int] = []


def _exit_now(signum, frame) -> None:
    # straight to file descriptor 2: sys.stderr may be a rich Live proxy that renders on stdout
    # (or be mid-write, where print would raise a reentrant-call error instead of exiting)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets it: one line
        os.write(2, b"error: interrupted (Ctrl-C)\n")
    os._exit(130)


def _raise(signum, frame) -> None:
    RECEIVED.append(signum)
    raise KeyboardInterrupt


def start_up() -> None:
    """Ctrl-C ends the process at once (nothing written yet)."""
    signal.signal(signal.SIGINT, _exit_now)


def writing() -> None:
    """Ctrl-C raises KeyboardInterrupt from here on (if start_up set the policy)."""
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is _exit_now:
        signal.signal(signal.SIGINT, _raise)


def written() -> None:
    """The command's writing is over: Ctrl-C ends the process at once again, with its line, so
    none can reach typer, which would turn it into a silent exit 130."""
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is _raise:
        signal.signal(signal.SIGINT, _exit_now)
