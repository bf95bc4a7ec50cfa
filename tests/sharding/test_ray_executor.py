"""`sharding build --executor ray` (issue 24): the same shards, byte for byte, as the local executor.

Real Ray throughout: a private local instance (`--executor ray --workers 2`, no address) and a two-node cluster
on this machine (`ray start --head` plus `ray start --address`, one CPU each, separate temp folders), driven
through the real command line. Faults are real too: the second node's raylet is killed mid-build, the driver
is killed mid-build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from sharding.build import build_shards
from sharding.manifest import load_manifest
from tools.ray_cluster import RayCluster, ray_env

from helpers.procs import start_group

pytest.importorskip("ray", reason="the dev extra installs ray; pip install -e '.[ray]'")
pytestmark = pytest.mark.slow


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file in a shard set (hidden files included: a leftover must show)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def build(env, raw: Path, out: Path, *extra: str, labels: Path | None = None, timeout=180):
    """`python -m sharding build` run from `out`'s folder (Ray puts a driver's working folder on its path)."""
    cmd = [sys.executable, "-m", "sharding", "build", "--raw", str(raw), "--out", str(out), "--shard-size", "16"]
    cmd += ["--quiet", *extra] + (["--labels", str(labels)] if labels else [])
    return subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=timeout)


def local_build(raw: Path, out: Path, labels: Path | None = None) -> dict[str, str]:
    build_shards(raw, out, labels=labels, shard_size=16, workers=1, progress=False)
    return digests(out)


@pytest.fixture(scope="module")
def env(subprocess_env) -> dict:
    return ray_env(subprocess_env)


@pytest.fixture(scope="module")
def cluster(env):
    c = RayCluster(env, nodes=2)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def layouts(phantom_raw, tmp_path_factory) -> dict[str, tuple[Path, Path | None]]:
    """The three input layouts: Kaggle (with a corrupt film), class folders, DICOM with a label CSV."""
    from sharding.phantom import PhantomSpec, generate

    root = tmp_path_factory.mktemp("layouts")
    kaggle = root / "kaggle" / phantom_raw.name
    shutil.copytree(phantom_raw, kaggle)
    (kaggle / "COVID" / "images" / "COVID-999.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    folders = root / "folders"
    for i, film in enumerate(sorted(phantom_raw.glob("*/images/*.png"))[:40]):
        (folders / ("left" if i % 3 else "right")).mkdir(parents=True, exist_ok=True)
        shutil.copy(film, folders / ("left" if i % 3 else "right") / f"{i}.png")
    dicom = generate(root / "dicom", PhantomSpec(counts=(10, 10, 10, 10), seed=3, format="dicom"))
    return {"kaggle": (kaggle.parent, None), "folders": (folders, None), "dicom": (dicom, dicom / "labels.csv")}


@pytest.mark.parametrize("layout", ["kaggle", "folders", "dicom"])
def test_a_two_node_cluster_writes_the_local_executors_bytes(layout, layouts, cluster, env, tmp_path):
    raw, labels = layouts[layout]
    expected = local_build(raw, tmp_path / "local", labels)
    done = build(env, raw, tmp_path / "ray", "--executor", "ray", "--ray-address", cluster.address, labels=labels)
    assert done.returncode == 0, done.stderr
    assert digests(tmp_path / "ray") == expected  # every shard and the manifest, and nothing else
    if layout == "kaggle":
        assert "COVID-999.png" in (tmp_path / "ray" / "manifest.json").read_text()  # skipped, with its reason


def test_predicted_masks_on_the_cluster_are_the_local_executors_bytes(layouts, cluster, env, tmp_path):
    """--lung-model on two nodes: each node checks torch and its CPU kernels, loads the segmenter, and writes the
    local executor's bytes."""
    import torch

    from sharding.segmenter import LungUNet, SegmenterSpec, save_segmenter

    raw = tmp_path / "raw"
    shutil.copytree(layouts["folders"][0], raw)  # class folders: no masks
    torch.manual_seed(0)
    model = tmp_path / "lungs.safetensors"
    save_segmenter(LungUNet(4, 3), SegmenterSpec(size=32, width=4, depth=3), model)
    build_shards(raw, tmp_path / "local", shard_size=16, workers=1, progress=False, lung_model=model)
    cmd = ["--executor", "ray", "--ray-address", cluster.address, "--lung-model", str(model)]
    done = build(env, raw, tmp_path / "ray", *cmd)
    assert done.returncode == 0, done.stderr
    assert digests(tmp_path / "ray") == digests(tmp_path / "local")
    assert load_manifest(tmp_path / "ray").counts["masks_predicted"] == 40


def test_the_private_local_instance_writes_the_same_bytes_and_stops(layouts, env, tmp_path):
    """`--executor ray --workers 2` without an address: Ray started and stopped by the build itself."""
    raw, _ = layouts["kaggle"]
    expected = local_build(raw, tmp_path / "local")
    before = _ray_processes()
    done = build(env, raw, tmp_path / "ray", "--executor", "ray", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert digests(tmp_path / "ray") == expected
    deadline = time.monotonic() + 120  # graceful: seconds; the margin is for a slow machine
    while _ray_processes() - before and time.monotonic() < deadline:
        time.sleep(1)
    assert not _ray_processes() - before, "the build left Ray processes running"


def test_a_node_running_other_code_is_refused_before_any_work(layouts, cluster, env, tmp_path):
    """The driver's sharding code differs from the nodes' (a changed copy first on its path): exit 2, naming it."""
    raw, _ = layouts["kaggle"]
    changed = tmp_path / "changed"
    shutil.copytree(Path(__file__).resolve().parents[2] / "sharding", changed / "sharding")
    with open(changed / "sharding" / "split.py", "a") as fh:
        fh.write("\n# a local edit\n")
    env = dict(env, PYTHONPATH=str(changed) + os.pathsep + env.get("PYTHONPATH", ""))
    done = build(env, raw, tmp_path / "out", "--executor", "ray", "--ray-address", cluster.address)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "would write different shard bytes: sharding code" in done.stderr and "same radstream" in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_input_that_changes_mid_build_is_named_as_on_the_local_executor(layouts, cluster, env, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(layouts["kaggle"][0], raw)
    victim, name = _a_film_of_the_test_split(raw, tmp_path / "probe")
    proc = _slow_cluster_build(raw, tmp_path / "out", cluster, env)
    staging = _wait_for_first_shard(tmp_path, proc)
    assert not list(staging.glob("test-*.tar"))
    victim.write_bytes(b"gone")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    assert f"{name} became unreadable during the build" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_the_second_nodes_raylet_killed_mid_build_still_gives_the_same_bytes(layouts, cluster, env, tmp_path):
    """Runs last in this module: it takes the second node down. Ray retries its tasks on the head."""
    raw, _ = layouts["kaggle"]
    expected = local_build(raw, tmp_path / "local")
    proc = _slow_cluster_build(raw, tmp_path / "ray", cluster, env)
    staging = _wait_for_first_shard(tmp_path, proc)
    raylet = cluster.raylet_pid(1)
    _wait_for_a_shard_task_under(raylet)  # the second node is writing a shard when it dies
    assert len(list(staging.glob("*.tar"))) < len(expected) - 1  # shards still to write: the kill lands mid-build
    os.kill(raylet, signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert digests(tmp_path / "ray") == expected  # no torn shard, no dead attempt's temporary file
    with pytest.raises(LookupError):
        cluster.raylet_pid(1)


def test_a_killed_driver_leaves_no_set_and_the_next_build_is_whole(layouts, env, tmp_path):
    raw, _ = layouts["kaggle"]
    expected = local_build(raw, tmp_path / "local")
    before = _ray_processes()
    cmd = [sys.executable, "-m", "sharding", "build", "--raw", str(raw), "--out", str(tmp_path / "ray"), "--quiet"]
    cmd += ["--shard-size", "16", "--executor", "ray", "--workers", "2", "--shard-delay-s", "1.5"]
    proc = start_group(cmd, env, tmp_path)
    _wait_for_first_shard(tmp_path, proc)
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as a user's `kill -9` would
    proc.wait(timeout=30)
    assert not (tmp_path / "ray").exists()  # nothing readable: the staging folder is hidden and incomplete
    # Ray's GCS and raylet share the driver's fate at once (its two agents follow within about a minute)
    deadline = time.monotonic() + 30
    while _ray_processes(b"raylet", b"gcs_server") - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(b"raylet", b"gcs_server") - before, "the private Ray instance outlived its driver"
    done = build(env, raw, tmp_path / "ray", "--executor", "ray", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert digests(tmp_path / "ray") == expected and not list(tmp_path.glob(".ray.*"))  # leftovers cleaned


def test_without_ray_installed_the_ray_executor_says_how_to_install_it(phantom_raw, subprocess_env, tmp_path):
    """Before anything else, even when the set is up to date (a scan of millions of films comes after)."""
    fake = tmp_path / "no_ray"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = dict(subprocess_env, PYTHONPATH=str(fake) + os.pathsep + subprocess_env.get("PYTHONPATH", ""))
    done = build(env, phantom_raw.parent, tmp_path / "out", "--executor", "ray")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--executor ray needs Ray" in done.stderr and "pip install -e '.[ray]'" in done.stderr
    assert not (tmp_path / "out").exists()
    before = local_build(phantom_raw.parent, tmp_path / "out")
    for extra in (["--executor", "ray"], ["--ray-address", "auto"]):
        done = build(env, phantom_raw.parent, tmp_path / "out", *extra)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "needs Ray" in done.stderr or "--ray-address needs --executor ray" in done.stderr
    assert digests(tmp_path / "out") == before


# --------------------------------------------------------------------------- helpers


def _ray_processes(*names: bytes) -> set[int]:
    """Ray's processes on this machine (raylet, GCS, workers, agents); with `names`, those whose command is one."""
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        command = args.split(b"\0")[0]
        if names and not any(command.endswith(b"/" + name) for name in names):
            continue
        if args.startswith(b"ray::") or b"/ray/core/src/ray/" in args or b"site-packages/ray/" in args:
            found.add(int(pid))
    return found


def _slow_cluster_build(raw: Path, out: Path, cluster: RayCluster, env: dict):
    """A build on the cluster that pauses 1.5 s after each shard (a fault lands mid-build), in its own session."""
    cmd = [sys.executable, "-m", "sharding", "build", "--raw", str(raw), "--out", str(out), "--quiet"]
    cmd += ["--shard-size", "16", "--executor", "ray", "--ray-address", cluster.address, "--shard-delay-s", "1.5"]
    return start_group(cmd, env, out.parent)


def _wait_for_first_shard(folder: Path, proc, timeout: float = 120.0) -> Path:
    """The build's staging folder once it holds a written shard."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for staging in folder.glob(".*.build-*"):
            if list(staging.glob("*.tar")):
                return staging
        if proc.poll() is not None:
            raise AssertionError(f"the build ended before writing a shard: {proc.stderr.read()}")
        time.sleep(0.05)
    raise TimeoutError("no shard written")


def _wait_for_a_shard_task_under(raylet: int, timeout: float = 60.0) -> None:
    """Until a shard-writing task (`ray::_run_one`) runs in a worker of this raylet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if parent == raylet and title.startswith(b"ray::_run_one"):
                return
        time.sleep(0.05)
    raise TimeoutError("no shard task ran on the second node")


def _a_film_of_the_test_split(raw: Path, scratch: Path) -> tuple[Path, str]:
    """A film of the test split (written last) and its path as the build names it, from a local build."""
    manifest = build_shards(raw, scratch, shard_size=16, workers=1, progress=False)
    with tarfile.open(scratch / manifest.split("test").shards[0].name) as tf:
        meta = next(json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json"))
    return next(raw.rglob(Path(meta["path"]).name)), meta["path"]
