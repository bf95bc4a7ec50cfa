"""sharding.files: atomic single and multi-file writes."""

from __future__ import annotations

import pytest

from sharding.files import atomic_write, atomic_write_all


def _set(folder, names=("a.bin", "b.bin", "c.json")):
    return {name: (folder / name).read_bytes() for name in names if (folder / name).exists()}


def test_atomic_write_all_replaces_the_whole_set(tmp_path):
    atomic_write_all(
        {tmp_path / n: (lambda t, n=n: t.write_bytes(b"old " + n.encode())) for n in ("a.bin", "b.bin", "c.json")}
    )
    atomic_write_all(
        {tmp_path / n: (lambda t, n=n: t.write_bytes(b"new " + n.encode())) for n in ("a.bin", "b.bin", "c.json")}
    )
    assert _set(tmp_path) == {"a.bin": b"new a.bin", "b.bin": b"new b.bin", "c.json": b"new c.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin", "c.json"]  # no temporaries


def test_a_failing_writer_leaves_the_previous_set_whole_and_no_temporaries(tmp_path):
    atomic_write_all(
        {tmp_path / n: (lambda t, n=n: t.write_bytes(b"old " + n.encode())) for n in ("a.bin", "b.bin", "c.json")}
    )
    before = _set(tmp_path)

    def disk_full(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    writes = {
        tmp_path / "a.bin": lambda t: t.write_bytes(b"new a"),
        tmp_path / "b.bin": lambda t: t.write_bytes(b"new b"),
        tmp_path / "c.json": disk_full,
    }
    with pytest.raises(OSError, match="No space left"):
        atomic_write_all(writes)
    assert _set(tmp_path) == before  # the first two were written to temporaries, never renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin", "c.json"]


def test_atomic_write_creates_the_folder_and_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "deep" / "x.txt"
    atomic_write(target, lambda t: t.write_text("one"))
    with pytest.raises(RuntimeError):
        atomic_write(target, lambda t: (t.write_text("two, half"), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert target.read_text() == "one" and [p.name for p in target.parent.iterdir()] == ["x.txt"]
