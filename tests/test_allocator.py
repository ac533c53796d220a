"""The allocator of compute processes: which one a mode asks for, and that child processes get it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_mil.allocator import (
    ALLOCATOR_ENV,
    JEMALLOC_CONF,
    REEXEC_MARKER_ENV,
    allocator_environment,
    jemalloc_library,
    requested_mode,
    resolve_mode,
)

needs_jemalloc = pytest.mark.skipif(jemalloc_library() is None, reason="no libjemalloc.so in the ray package here")

_WORKERS_PROBE = """
import json, sys, torch
from torch.utils.data import DataLoader, Dataset
from wsi_mil.allocator import active_allocator, tune_this_process, tune_worker

class Probe(Dataset):
    def __len__(self):
        return 2
    def __getitem__(self, index):
        return active_allocator()

if __name__ == "__main__":
    in_process = sys.argv[1] == "in-process"  # as extract_features does for a library caller
    seen = {"main": tune_this_process() if in_process else active_allocator()}
    for context in ("fork", "spawn"):
        loader = DataLoader(Probe(), batch_size=2, num_workers=1, multiprocessing_context=context,
                            worker_init_fn=tune_worker if in_process else None)
        seen[context] = sorted(set(next(iter(loader))))
    print(json.dumps(seen))
"""


def test_mode_comes_from_the_environment_and_rejects_unknown_values() -> None:
    assert requested_mode({}) == "auto"
    assert requested_mode({ALLOCATOR_ENV: " System "}) == "system"
    with pytest.raises(ValueError, match="tcmalloc"):
        requested_mode({ALLOCATOR_ENV: "tcmalloc"})


def test_system_mode_changes_nothing() -> None:
    assert allocator_environment("system") == {}


@needs_jemalloc
def test_auto_is_jemalloc_with_decay_off_and_keeps_a_users_preload() -> None:
    assert resolve_mode("auto") == "jemalloc"
    env = allocator_environment("auto", {"LD_PRELOAD": "/opt/mine.so", "MALLOC_CONF": "narenas:2"})
    assert env["LD_PRELOAD"].split() == [str(jemalloc_library()), "/opt/mine.so"]
    assert env["MALLOC_CONF"] == f"{JEMALLOC_CONF},narenas:2"


def test_tuned_glibc_never_mmaps_large_blocks() -> None:
    assert "glibc.malloc.mmap_max=0" in allocator_environment("glibc", {})["GLIBC_TUNABLES"].split(":")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        pytest.param("jemalloc", "jemalloc", marks=needs_jemalloc),  # the command line's restart
        ("in-process", "glibc (tuned)"),  # a library caller: mallopt in the process and its workers
        ("system", "glibc"),  # the opt-out
    ],
)
def test_dataloader_workers_forked_and_spawned_get_the_allocator(mode: str, expected: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in (ALLOCATOR_ENV, REEXEC_MARKER_ENV, "LD_PRELOAD", "GLIBC_TUNABLES")}
    if mode == "jemalloc":
        env.update(allocator_environment(mode, env))  # type: ignore[arg-type]
    if mode == "system":
        env[ALLOCATOR_ENV] = "system"
    probe = tmp_path / "probe.py"
    probe.write_text(_WORKERS_PROBE)
    done = subprocess.run([sys.executable, str(probe), "in-process" if mode in ("in-process", "system") else "env"], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"main": expected, "fork": [expected], "spawn": [expected]}
