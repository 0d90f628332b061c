"""How Ctrl-C stops the command line.

Before a command writes anything (start-up: torch, transformers and their native extensions
importing; planning), Ctrl-C prints one line and ends the process at once: an exception raised
into an import can crash native code (pybind11 aborts on it) or be swallowed by a library and
resurface later as some other error. From the moment a command starts writing, Ctrl-C raises
KeyboardInterrupt instead, so the pipeline can drop its unfinished shard and keep the finished
ones for --resume; the signal is recorded, so an error a library made of it still reads as
the interruption it is. Only `python -m mxptq` / the `mxptq` script installs these handlers;
in-process callers keep Python's default.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

RECEIVED: list[int] = []


def _exit_now(signum, frame) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets it: one line
        print("error: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
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
