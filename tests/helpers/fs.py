"""File-system faults that hold for root too (CI runs as root, and root writes through chmod 555)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def unwritable_folder(path: Path) -> Iterator[Path]:
    """A folder nobody can create files in: chmod 555 for a normal user, the immutable attribute for root."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        undo = ["chmod", "755", str(path)]
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", str(path)]
    else:
        pytest.skip("root, and no chattr +i on this file system: cannot make a folder root cannot write")
    try:
        try:
            (path / "probe").touch()
        except OSError:
            pass
        else:
            pytest.skip(f"{path} is still writable here")
        yield path
    finally:
        subprocess.run(undo, check=True)
