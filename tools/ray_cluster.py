"""A real Ray cluster on this machine (for the executor tests and the build benchmark): nodes from `ray start --block`.

Each node runs in its own session (so one `killpg` stops it and everything it started) with its own temp
folder, short enough for Ray's Unix sockets (107 characters). Token authentication stays on: every node and
driver gets the same random token through the environment, so nothing is written under ~/.ray.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def ray_env(base: dict) -> dict:
    """`base` with token authentication on and a fresh token (for a cluster and its drivers alike)."""
    env = dict(base)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """`nodes` nodes of `cpus` CPUs each (the first is the head) on 127.0.0.1; `stop()` kills them all."""

    def __init__(self, env: dict, nodes: int = 2, cpus: int = 1, timeout: float = 90.0) -> None:
        self.env = env
        self.cpus = cpus
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dirs: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        try:
            for i in range(nodes):
                self.add_node(head=i == 0)
                self.wait_for(i + 1, timeout)
        except BaseException:
            self.stop()
            raise

    def add_node(self, head: bool) -> None:
        temp = Path(tempfile.mkdtemp(prefix="rayt", dir="/tmp"))
        self.dirs.append(temp)
        where = ["--head", "--port", str(self.port), "--include-dashboard", "false"] if head else []
        where = where or ["--address", self.address]
        cmd = [
            RAY,
            "start",
            *where,
            "--num-cpus",
            str(self.cpus),
            "--temp-dir",
            str(temp),
            "--block",
            "--disable-usage-stats",
        ]
        with open(temp / "start.log", "w") as log:  # the child keeps its own descriptor
            self.procs.append(
                subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def alive_nodes(self) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _COUNT_NODES, self.address], env=self.env, capture_output=True, text=True, timeout=60
        )
        return int(out.stdout.strip() or 0) if out.returncode == 0 else 0

    def wait_for(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a ray node exited: {self.logs()}")
            if self.alive_nodes() >= n:
                return
            time.sleep(0.5)
        raise TimeoutError(f"the Ray cluster did not reach {n} nodes in {timeout:.0f}s: {self.logs()}")

    def raylet_pid(self, node: int) -> int:
        """The raylet process of node `node` (found by its temp folder on the command line)."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"raylet/raylet") and str(self.dirs[node]).encode() in b" ".join(args):
                return int(pid)
        raise LookupError(f"no raylet for node {node}")

    def logs(self) -> str:
        return " | ".join((d / "start.log").read_text()[-400:] for d in self.dirs if (d / "start.log").exists())

    def stop(self) -> None:
        """SIGKILL every node's session (raylet, GCS, agents); task workers exit with their raylet."""
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


_COUNT_NODES = """
import sys, logging, ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
"""
