"""Child processes the kill-and-resume tests start."""

from __future__ import annotations

import subprocess


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """``(returncode, stdout, stderr)`` of ``proc`` once it ends; killed (and reaped) when
    it outlives ``timeout`` seconds or the wait is interrupted."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err
