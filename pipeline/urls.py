"""Shard locations: brace patterns, local/file:/http(s)/pipe:/gs:/s3 URLs, a local cache.

Every URL a loader opens goes through `open_url`, so the same rules hold for
shards and for `manifest.json`:

- a local path or `file:` URL opens the file;
- `http://` / `https://` streams with `urllib` (no curl needed);
- `pipe:CMD` runs `CMD` in a shell and reads its stdout; a non-zero exit
  status raises when the stream is closed (so a failed download is an error,
  not a short shard);
- `gs://b/k` becomes `pipe:gsutil cat gs://b/k`, `s3://b/k` becomes
  `pipe:aws s3 cp s3://b/k -`.

**Secure mode.** `pipe:` URLs execute shell commands. Set the environment
variable `RADSTREAM_ALLOW_PIPE=0` (or pass `allow_pipe=False`) to refuse them
(and therefore `gs://` and `s3://`, which map to pipes) with `PermissionError`.

**Cache.** With `cache_dir`, a remote shard (http(s), pipe:, gs:, s3:) is
downloaded once to `cache_dir/<hash of url and manifest sha256>-<name>` (temporary name, then an atomic
link, so a crashed download never leaves a half shard) and read from local
disk afterwards; local shards are never copied. Every rank of a node (and of
nodes sharing the cache folder) goes through one lock file per shard
(`cache_dir/.locks/`): one process downloads, the others wait and then read its
copy. A verified copy is never replaced (a rank that indexed it by size and
mtime would see it change), and temporary names carry host, pid and a random
part, so writers on different hosts never share one.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import shlex
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from braceexpand import braceexpand
from filelock import FileLock

from pipeline.fast_tar import ShardFormatError

ALLOW_PIPE_ENV = "RADSTREAM_ALLOW_PIPE"
HTTP_TIMEOUT_S = 60.0


def pipes_allowed(allow_pipe: bool | None = None) -> bool:
    """Whether `pipe:` URLs may run: the argument wins, else env RADSTREAM_ALLOW_PIPE (default yes)."""
    if allow_pipe is not None:
        return allow_pipe
    return os.environ.get(ALLOW_PIPE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def expand_urls(pattern: str | list[str]) -> list[str]:
    """Brace-expand `train-{000000..000009}.tar` (or a list of such) into a list of URLs."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return [u for p in patterns for u in braceexpand(p)]


def normalize_url(url: str) -> str:
    """Map cloud schemes to the pipe commands that read them; leave the rest alone."""
    if url.startswith("gs://"):
        return f"pipe:gsutil cat {shlex.quote(url)}"
    if url.startswith("s3://"):
        return f"pipe:aws s3 cp {shlex.quote(url)} -"
    return url


def is_remote(url: str) -> bool:
    url = normalize_url(str(url))
    return url.startswith(("http://", "https://", "pipe:"))


def local_path(url: str) -> Path | None:
    """The file system path of a local path or file: URL, else None."""
    url = str(url)
    if url.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if url.startswith("file:"):
        return Path(url[len("file:") :])
    if "://" in url or url.startswith("pipe:"):
        return None
    return Path(url)


def join_url(base: str | Path, name: str) -> str:
    """`base` (folder, file:, http(s), gs:, s3: prefix) joined with a member name."""
    base = str(base)
    if base.startswith("pipe:"):
        raise ValueError("a pipe: command cannot be a shard prefix; give gs://, s3:// or http(s):// instead")
    return base + ("" if base.endswith("/") else "/") + name


class PipeStream(io.RawIOBase):
    """stdout of a shell command as a readable binary stream; a failing command raises on close/EOF."""

    def __init__(self, cmd: str):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, bufsize=0)  # noqa: S602 - documented pipe:
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.proc.stdout.readinto(b)
        if n == 0:
            self._check()
        return n

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        status = self.proc.wait()
        if status != 0:
            raise OSError(f"pipe command failed with exit status {status}: {self.cmd}")

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.proc.poll() is None:
                self.proc.stdout.close()
                self.proc.kill()
                self.proc.wait()
                self._checked = True
            else:
                self.proc.stdout.close()
        finally:
            super().close()


def _open_uncached(url: str, allow_pipe: bool | None) -> BinaryIO:
    url = normalize_url(url)
    if url.startswith("pipe:"):
        if not pipes_allowed(allow_pipe):
            raise PermissionError(
                f"pipe: URLs are disabled ({ALLOW_PIPE_ENV}=0 or allow_pipe=False); refusing to run: {url[5:]}"
            )
        return io.BufferedReader(PipeStream(url[5:]), buffer_size=1 << 20)
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)  # noqa: S310 - schemes checked above
    path = local_path(url)
    assert path is not None, url
    return open(path, "rb")


def cache_path(url: str, cache_dir: str | Path, sha256: str | None = None) -> Path:
    """Where `url` is cached: readable tail of the URL plus a short hash of the URL and the expected content.

    The content digest is in the key because shards rebuilt under the same names
    must not be served from the old build's cached bytes.
    """
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", str(url).rstrip("/").split("/")[-1].split()[0])[-80:]
    digest = hashlib.sha1(f"{url}\0{sha256 or ''}".encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{digest}-{tail}"


def open_url(
    url: str, *, cache_dir: str | Path | None = None, allow_pipe: bool | None = None, sha256: str | None = None
) -> BinaryIO:
    """A readable binary stream for a shard or manifest URL (see the module docstring).

    With `cache_dir` and `sha256`, a download enters the cache only when its
    digest matches (ShardFormatError otherwise): a truncated or altered
    transfer is never read, nor kept for later epochs.
    """
    url = str(url)
    if cache_dir is None or not is_remote(url):
        return _open_uncached(url, allow_pipe)
    target = cache_path(url, cache_dir, sha256)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        locks = target.parent / ".locks"
        locks.mkdir(exist_ok=True)
        # flock: released by the kernel if the holder dies, so a killed download never wedges its peers
        with FileLock(locks / f"{target.name}.lock"):
            if not target.exists():  # else a peer fetched it while this process waited
                _download(url, target, allow_pipe, sha256)
    return open(target, "rb")


def _download(url: str, target: Path, allow_pipe: bool | None, sha256: str | None) -> None:
    """Fetch `url` to a temporary name, check its digest, and link it in as `target` unless one is there."""
    tmp = target.with_name(f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
    digest = hashlib.sha256()
    try:
        with _open_uncached(url, allow_pipe) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ShardFormatError(
                f"download of {url} has sha256 {digest.hexdigest()[:16]}…, the manifest "
                f"says {sha256[:16]}… (truncated or altered in transit); not cached"
            )
        try:
            os.link(tmp, target)  # atomic, and never over an existing copy: the first finished one wins
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            if not target.exists():
                os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def url_opener(data, *, cache_dir: str | Path | None = None, allow_pipe: bool | None = None):
    """webdataset-style stage: {"url": u} -> {"url": u, "stream": open stream}."""
    for sample in data:
        url = sample["url"]
        yield {**sample, "stream": open_url(url, cache_dir=cache_dir, allow_pipe=allow_pipe)}


__all__ = [
    "ALLOW_PIPE_ENV",
    "cache_path",
    "expand_urls",
    "is_remote",
    "join_url",
    "local_path",
    "normalize_url",
    "open_url",
    "pipes_allowed",
    "url_opener",
]
