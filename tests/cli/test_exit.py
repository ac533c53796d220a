"""Leaving without interpreter teardown (`wsi_mil.cli._exit`): same status, same output, the
`atexit` handlers still run, and running non-daemon threads are still waited for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wsi_mil.cli._exit import exit_code_of


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (3, 3), (2, 2)])
def test_exit_code_of_matches_sys_exit(code: int | None, status: int) -> None:
    assert exit_code_of(SystemExit(code)) == status


def test_exit_code_of_a_message_prints_it_and_is_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code_of(SystemExit("no slides found")) == 1
    assert capsys.readouterr().err.strip() == "no slides found"


def test_exit_now_keeps_the_status_flushes_output_and_runs_atexit_handlers() -> None:
    completed = _run(
        "import atexit, sys\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "from wsi_mil.cli._exit import exit_now\n"
        "print('buffered', end=' '); sys.stderr.write('to stderr')\n"
        "exit_now(3)\n"
        "print('never printed')\n"
    )
    assert completed.returncode == 3
    assert completed.stdout == "buffered handler ran\n"
    assert completed.stderr == "to stderr"


def test_exit_now_waits_for_a_running_non_daemon_thread(tmp_path: Path) -> None:
    marker = tmp_path / "written_by_the_thread"
    completed = _run(
        "import threading, time\n"
        "from pathlib import Path\n"
        "from wsi_mil.cli._exit import exit_now\n"
        f"def work():\n    time.sleep(0.5)\n    Path({str(marker)!r}).write_text('done')\n"
        "threading.Thread(target=work).start()\n"
        "exit_now(0)\n"
    )
    assert completed.returncode == 0, completed.stderr
    assert marker.read_text() == "done"


def test_the_command_line_exit_status_survives_the_fast_exit(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "wsi_mil.cli", "preprocess", str(tmp_path / "missing.svs"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    assert "missing.svs" in completed.stderr + completed.stdout
