"""Linux /proc probes for fault and soak tests: child processes, resident memory, open fds."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path


def start_group(cmd: list[str], env: dict, cwd, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    """Start `cmd` in its own session (so `os.killpg(proc.pid, ...)` reaches every child), stderr piped as text."""
    return subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def limit_file_size(limit: int):
    """A `preexec_fn` capping the size of any file the child writes (a full disk, without filling one)."""

    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def find_trainer(launcher_pid: int, timeout: float = 120.0) -> int:
    """The `train/main.py` python process under the accelerate launcher."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack = list(children(launcher_pid))
        while stack:
            pid = stack.pop()
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"train/main.py") for part in cmd):
                return pid
            stack.extend(children(pid))
        time.sleep(0.2)
    raise RuntimeError("the training process did not appear under the launcher")
