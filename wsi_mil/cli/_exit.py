"""Leaving the process without the interpreter's teardown once a command has finished.

With torch, timm and the torch._dynamo they import loaded, CPython's finalisation (clearing every
module and collecting the object graph) takes 1.7-2 s on a 2-core machine, longer than the whole
set-up of a one-slide run. By the time a command returns, every output file has been closed and
renamed into place, so the command line flushes its streams, runs the `atexit` handlers (logging,
multiprocessing, Ray) and ends the process directly.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def exit_code_of(exit: SystemExit) -> int:
    """The status `sys.exit(code)` gives: None is 0, an int itself, anything else is printed and 1."""
    code = exit.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def other_live_threads() -> list[threading.Thread]:
    """Non-daemon threads besides this one: normal shutdown would wait for them, so we must too."""
    current = threading.current_thread()
    return [t for t in threading.enumerate() if t is not current and not t.daemon and t.is_alive()]


def exit_now(code: int) -> None:
    """End the process with `code` after flushing stdio and running the `atexit` handlers; falls
    back to a normal `sys.exit` while non-daemon threads are still running."""
    if other_live_threads():
        sys.exit(code)
    atexit._run_exitfuncs()  # what normal shutdown runs first; os._exit skips it
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written
            pass
    os._exit(code)
