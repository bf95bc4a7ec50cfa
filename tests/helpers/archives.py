"""Crafted archives for tests: zip files with links or special members, and tar shards edited member by member."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

Members = list[tuple[tarfile.TarInfo, bytes]]


def zip_bytes(
    entries: dict[str, bytes], links: dict[str, str] | None = None, special: dict[str, int] | None = None
) -> bytes:
    """A zip of `entries`, plus unix symlinks (name -> target) and members of a special file type (name -> S_IF*)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        unix = {name: ((stat.S_IFLNK | 0o777), target.encode()) for name, target in (links or {}).items()}
        unix.update({name: ((kind | 0o644), b"") for name, kind in (special or {}).items()})
        for name, (mode, data) in unix.items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # unix: external_attr carries st_mode
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return buf.getvalue()


def read_members(path: Path) -> Members:
    with tarfile.open(path) as tf:
        return [(m, tf.extractfile(m).read()) for m in tf.getmembers()]


def write_members(path: Path, members: Members) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def rewrite_tar(path: Path, edit: Callable[[Members], Members]) -> None:
    """Replace the tar at `path` by `edit(its members)`."""
    write_members(path, edit(read_members(path)))
