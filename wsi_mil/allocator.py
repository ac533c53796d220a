"""The memory allocator of compute processes: keep CNN activation buffers instead of returning them.

With glibc's defaults every forward pass mmaps, zero-fills and unmaps its large activation buffers,
so a quarter to a half of a preprocessing run's CPU time is kernel time (docs/benchmarks.md). The
`wsi-mil` commands that run an encoder re-execute themselves once at start-up with an allocator that
keeps freed memory (`ALLOCATOR_ENV`, default `auto`):

- `jemalloc`: the libjemalloc.so that the `ray` wheel ships (a dependency), preloaded with decay off;
- `glibc`: glibc's own malloc told never to mmap, trim or return memory (`GLIBC_TUNABLES`);
- `system`: nothing changed (the opt-out).

`auto` is jemalloc where its library is found, else tuned glibc. Child processes (DataLoader
workers, forked or spawned, and pool processes) inherit the environment and so the allocator.
Code that runs without the command line (`preprocess_slide` from Python) gets the tuned-glibc
settings in process through mallopt (`tune_this_process`): as few CPU-seconds per tile as jemalloc
in the measurements, with a less steady peak RSS (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, get_args

ALLOCATOR_ENV = "WSI_MIL_ALLOCATOR"
#: set in the re-executed process, so it never re-executes twice
REEXEC_MARKER_ENV = "WSI_MIL_ALLOCATOR_ACTIVE"
AllocatorMode = Literal["auto", "jemalloc", "glibc", "system"]
ALLOCATOR_MODES: tuple[str, ...] = get_args(AllocatorMode)

#: jemalloc keeps dirty and muzzy pages forever (decay -1): freed buffers are reused, never unmapped
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
#: glibc: no mmap for large blocks, the heap top trimmed only above 1 GiB free, 64 MiB of slack per growth
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=0x40000000:glibc.malloc.top_pad=0x4000000"
#: the same through mallopt(3) in a running process: (M_MMAP_MAX, M_TRIM_THRESHOLD, M_TOP_PAD)
_MALLOPT_SETTINGS = ((-4, 0), (-1, 1 << 30), (-2, 64 << 20))


def requested_mode(environ: Mapping[str, str] | None = None) -> AllocatorMode:
    """The mode `ALLOCATOR_ENV` asks for (`auto` when unset); an unknown value raises ValueError."""
    value = (environ if environ is not None else os.environ).get(ALLOCATOR_ENV, "auto").strip().lower() or "auto"
    if value not in ALLOCATOR_MODES:
        raise ValueError(f"{ALLOCATOR_ENV}={value!r}: use one of {', '.join(ALLOCATOR_MODES)}")
    return value  # type: ignore[return-value]


def jemalloc_library() -> Path | None:
    """The libjemalloc.so inside the installed `ray` package (found without importing ray), or None."""
    if not sys.platform.startswith("linux"):
        return None
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        library = Path(folder) / "core" / "libjemalloc.so"
        if library.is_file():
            return library
    return None


def allocator_environment(mode: AllocatorMode, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables that give a new process the allocator of `mode` (empty for system)."""
    env = environ if environ is not None else os.environ
    resolved = resolve_mode(mode)
    if resolved == "jemalloc":
        preload = " ".join(p for p in (str(jemalloc_library()), env.get("LD_PRELOAD", "")) if p)
        conf = ",".join(c for c in (JEMALLOC_CONF, env.get("MALLOC_CONF", "")) if c)
        return {"LD_PRELOAD": preload, "MALLOC_CONF": conf}
    if resolved == "glibc":
        tunables = ":".join(t for t in (GLIBC_TUNABLES, env.get("GLIBC_TUNABLES", "")) if t)
        return {"GLIBC_TUNABLES": tunables}
    return {}


def resolve_mode(mode: AllocatorMode) -> Literal["jemalloc", "glibc", "system"]:
    """`auto` → jemalloc where its library is found (Linux), else glibc on Linux, else system."""
    if mode == "auto":
        if jemalloc_library() is not None:
            return "jemalloc"
        return "glibc" if sys.platform.startswith("linux") else "system"
    if mode == "jemalloc" and jemalloc_library() is None:
        raise ValueError(f"{ALLOCATOR_ENV}=jemalloc: no libjemalloc.so found (it ships with the ray package on Linux)")
    return mode


def active_allocator() -> str:
    """What this process allocates with: `jemalloc` (loaded), `glibc (tuned)` or `glibc`."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    if "libjemalloc" in maps:
        return "jemalloc"
    if _tuned_in_process or "mmap_max=0" in os.environ.get("GLIBC_TUNABLES", ""):
        return "glibc (tuned)"
    return "glibc"


def reexec_with_allocator(argv: Sequence[str] | None = None) -> None:
    """Replace this process by the same command with the requested allocator, once; return when
    there is nothing to do (opt-out, already active, not Linux) or exec is impossible."""
    if os.environ.get(REEXEC_MARKER_ENV):
        return
    try:
        mode = resolve_mode(requested_mode())
    except ValueError as err:
        print(f"warning: {err}; keeping the system allocator", file=sys.stderr)
        return
    extra = allocator_environment(mode)
    if not extra:
        return
    command = list(argv if argv is not None else sys.orig_argv)
    try:
        os.execve(sys.executable, command, {**os.environ, **extra, REEXEC_MARKER_ENV: mode})
    except OSError as err:  # keep running with the system allocator rather than fail
        print(f"warning: could not restart with the {mode} allocator ({err})", file=sys.stderr)


_tuned_in_process = False


def tune_this_process() -> str:
    """Where this process still runs glibc's defaults and the mode is not `system`, set the
    tuned-glibc parameters with mallopt (no restart needed; forked children inherit them). For
    processes no command line started with the allocator: a library call, a spawned worker.
    Returns `active_allocator()`."""
    global _tuned_in_process
    try:
        mode = requested_mode()
    except ValueError:
        mode = "system"
    if mode != "system" and sys.platform.startswith("linux") and active_allocator() == "glibc":
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            return active_allocator()
        _tuned_in_process = all(mallopt(option, value) == 1 for option, value in _MALLOPT_SETTINGS)
    return active_allocator()


def tune_worker(_worker_id: int) -> None:
    """`worker_init_fn` for DataLoader workers: `tune_this_process` in each (a no-op where inherited)."""
    tune_this_process()
