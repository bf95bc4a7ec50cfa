"""The writer: the shard contract's members, and byte-identical shards from the same samples."""

from __future__ import annotations

import hashlib
import subprocess

import numpy as np
import pytest

from sharding.writer import encode_sample, write_shard


def _samples(encoding: str) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        image = rng.integers(0, 256, (1, 8, 8), dtype=np.uint8)
        mask = (rng.random((8, 8)) > 0.5).astype(np.uint8)
        meta = {"split": "train", "source": "site-a", "class": "COVID", "path": f"COVID/images/COVID-{i}.png"}
        out.append(encode_sample(f"COVID-{i}", image, i % 2, meta, encoding, mask))
    return out


#: sha256 of the raw shard `_samples` makes: the same samples give the same bytes on any machine and in any
#: version (a change here changes every shard: bump sharding.build.BUILD_VERSION with it).
PINNED_RAW = "7536bb5f1276f6fcbb588388c4276e85d904b5aa863a0758e13d9b8c090ca410"


def test_the_same_samples_give_the_same_shard_bytes(tmp_path):
    info = write_shard(tmp_path / "s.tar", _samples("raw"), num_classes=4)
    assert info.sha256 == hashlib.sha256((tmp_path / "s.tar").read_bytes()).hexdigest() == PINNED_RAW
    assert (info.samples, tuple(info.class_counts), info.bytes) == (
        3,
        (2, 1, 0, 0),
        (tmp_path / "s.tar").stat().st_size,
    )


def test_png_members_are_pillows_level_6_png():
    """PNG bytes depend on the zlib Pillow ships, so they are compared with Pillow's own level-6 encoding of the
    same pixels rather than pinned; the pixels read back unchanged."""
    import io

    from PIL import Image

    for sample, raw in zip(_samples("png"), _samples("raw")):
        pixels = np.load(io.BytesIO(raw["image.npy"]))[0]
        want = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(want, format="PNG", compress_level=6)
        assert sample["image.png"] == want.getvalue()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["image.png"]))), pixels)


def test_encode_sample_members_and_refusals():
    image = np.zeros((8, 8), np.uint8)
    sample = encode_sample("k", image, 2, {"b": 1, "a": 2})
    assert set(sample) == {"__key__", "image.npy", "cls", "json"} and sample["cls"] == b"2"
    assert sample["json"] == b'{"a":2,"b":1}', "keys sorted, no spaces"
    with pytest.raises(TypeError, match="image must be uint8, got float32"):
        encode_sample("k", image.astype(np.float32), 0, {})


def test_a_failed_write_leaves_nothing_and_prints_nothing(tmp_path, python_exe, subprocess_env, repo_root):
    """A sample that fails mid-shard: the error reaches the caller, no file or temporary is left, and the
    abandoned tar does not try to finish itself later (tarfile's finaliser would print a traceback into the
    log of every build that skipped a bad shard)."""
    import subprocess
    import textwrap

    script = textwrap.dedent(
        f"""
        import gc
        import numpy as np
        from sharding.writer import encode_sample, write_shard

        def samples():
            yield encode_sample("a", np.zeros((4, 4), np.uint8), 0, {{}})
            raise RuntimeError("bad sample")

        try:
            write_shard({str(tmp_path / "s.tar")!r}, samples())
        except RuntimeError as exc:
            print("caught", exc)
        gc.collect()
        """
    )
    done = subprocess.run([python_exe, "-c", script], capture_output=True, text=True, env=subprocess_env, cwd=repo_root)
    assert done.returncode == 0 and done.stdout == "caught bad sample\n"
    assert done.stderr == "", done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_shards_are_byte_for_byte_what_webdatasets_tar_writer_writes(tmp_path, encoding):
    """The writer uses `tarfile` alone; webdataset's TarWriter (encoder off, the same fixed metadata) is the oracle."""
    import webdataset as wds

    samples = _samples(encoding)
    image = np.zeros((1, 4, 4), np.uint8)
    samples.append(encode_sample("x" * 120, image, 3, {"path": "x" * 130}, encoding))  # names past 100 bytes
    samples.append(encode_sample("Ω/ünïcode key", image, 2, {"path": "Ω.png"}, encoding))  # non-ASCII names
    write_shard(tmp_path / "ours.tar", samples, num_classes=4)
    with open(tmp_path / "wds.tar", "wb") as fh:
        writer = wds.TarWriter(fh, user="radstream", group="radstream", mtime=0, encoder=False)
        for sample in samples:
            writer.write(sample)
        writer.close()
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "wds.tar").read_bytes()


def test_a_build_worker_imports_neither_webdataset_nor_torch(python_exe, subprocess_env, tmp_path):
    """A fresh worker process (a Ray worker) pays seconds for torch; the build's per-sample code needs neither."""
    code = (
        "import sys, numpy as np\n"
        "from sharding.writer import encode_sample, write_shard\n"
        "import sharding.encode, sharding.build\n"
        f"write_shard({str(tmp_path / 's.tar')!r}, [encode_sample('k', np.zeros((4, 4), np.uint8), 0, {{}})], 4)\n"
        "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))\n"
    )
    done = subprocess.run([python_exe, "-c", code], env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_text_members_are_written_as_utf8_and_other_values_refused(tmp_path):
    import tarfile

    sample = {**encode_sample("k", np.zeros((4, 4), np.uint8), 1, {}), "txt": "héllo"}
    write_shard(tmp_path / "s.tar", [sample], num_classes=4)
    with tarfile.open(tmp_path / "s.tar") as tf:
        assert tf.extractfile("k.txt").read() == "héllo".encode()
    with pytest.raises(ValueError, match="^sample k: member n is int, not bytes$"):
        write_shard(tmp_path / "t.tar", [{**sample, "n": 3}], num_classes=4)
    assert not (tmp_path / "t.tar").exists()
