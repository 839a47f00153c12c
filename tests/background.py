"""Long checks that run in a subprocess of their own (the CUDA backend on its CPU emulation, the native tests under
the sanitizers) start when the session's tests are collected, beside the rest of the suite, and their tests,
moved to the end of the session, collect the results. The rest of the suite mostly keeps one core busy, so on a
2-core CI machine these overlap it instead of adding their minutes to it. Run alone, a test starts its own job."""

from __future__ import annotations

import os
import subprocess
import tempfile
from typing import IO, Dict, List, Optional, Tuple

_jobs: Dict[str, Tuple[subprocess.Popen, IO[bytes]]] = {}


def start(name: str, argv: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> None:
    """Start job `name` unless it runs already; its output goes to a temporary file."""
    if name in _jobs:
        return
    out = tempfile.TemporaryFile()
    _jobs[name] = (subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd), out)


def result(name: str, argv: List[str], timeout: float, env: Optional[Dict[str, str]] = None,
           cwd: Optional[str] = None) -> Tuple[int, str]:
    """(exit status, output) of job `name`, started now if the session did not start it."""
    start(name, argv, env, cwd)
    proc, out = _jobs.pop(name)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out.seek(0)
    text = out.read().decode("utf-8", "replace")
    out.close()
    return proc.returncode, text


def stop_all() -> None:
    """Kill the jobs nobody collected (their tests were deselected, or the session was interrupted)."""
    for proc, out in _jobs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    _jobs.clear()


def env_with(**extra: str) -> Dict[str, str]:
    return dict(os.environ, **extra)
