"""download: fake Kaggle API serving a zip, zip-slip refusal, credentials message, no-op when present."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sharding.contract import CLASSES, DATASET_DIR
from sharding.download import CredentialsError, DownloadError, credentials_source, download

from helpers.archives import zip_bytes


def _dataset_entries() -> dict[str, bytes]:
    from sharding.phantom import PhantomSpec, png_bytes, render_sample

    image, _ = render_sample(PhantomSpec(counts=(1,) * 4), 0, 0)
    entries = {f"{DATASET_DIR}/{c}/images/{c}-1.png": png_bytes(image) for c in CLASSES}
    entries[f"{DATASET_DIR}/README.md.txt"] = b"fake"
    return entries


class FakeApi:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.calls = []

    def authenticate(self) -> None:
        self.calls.append("authenticate")

    def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False, licenses=()):
        self.calls.append(("download", dataset, unzip))
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "covid19-radiography-database.zip").write_bytes(self.payload)


def test_fake_kaggle_download_extracts_and_then_noops(tmp_path):
    api = FakeApi(zip_bytes(_dataset_entries()))
    target, fetched = download(tmp_path / "raw", api_factory=lambda: api, log=lambda s: None)
    assert fetched and target == tmp_path / "raw" / DATASET_DIR
    assert api.calls[0] == "authenticate" and api.calls[1][1] == "tawsifurrahman/covid19-radiography-database"
    assert sorted(p.name for p in target.iterdir() if p.is_dir()) == sorted(CLASSES)
    assert [p.name for p in (tmp_path / "raw").iterdir()] == [DATASET_DIR]  # no temp folder left
    again = FakeApi(b"")
    assert download(tmp_path / "raw", api_factory=lambda: again) == (target, False)
    assert again.calls == []
    from sharding.build import build_shards

    m = build_shards(tmp_path / "raw", tmp_path / "shards", workers=1, progress=False)
    assert m.counts["written"] == 4


@pytest.mark.parametrize("evil", ["../escape.txt", "/abs/escape.txt", f"{DATASET_DIR}/../../escape.txt"])
def test_zip_slip_refused_and_nothing_left(tmp_path, evil):
    entries = _dataset_entries()
    entries[evil] = b"pwned"
    api = FakeApi(zip_bytes(entries))
    with pytest.raises(DownloadError, match="unsafe path|outside"):
        download(tmp_path / "raw", api_factory=lambda: api, log=lambda s: None)
    assert not list((tmp_path / "raw").iterdir())
    assert not list(tmp_path.rglob("escape.txt"))


def test_symlink_member_refused(tmp_path):
    api = FakeApi(zip_bytes(_dataset_entries(), links={f"{DATASET_DIR}/COVID/images/link.png": "/etc/passwd"}))
    with pytest.raises(DownloadError, match="link"):
        download(tmp_path / "raw", api_factory=lambda: api, log=lambda s: None)
    assert not list((tmp_path / "raw").iterdir())


def test_archive_without_dataset_refused(tmp_path):
    api = FakeApi(zip_bytes({"something/else.txt": b"x"}))
    with pytest.raises(DownloadError, match="class folders"):
        download(tmp_path / "raw", api_factory=lambda: api, log=lambda s: None)
    assert not (tmp_path / "raw" / DATASET_DIR).exists()


def test_credentials_sources(tmp_path):
    with pytest.raises(CredentialsError, match="KAGGLE_USERNAME and KAGGLE_KEY"):
        credentials_source({}, home=tmp_path)
    assert "environment" in credentials_source({"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}, home=tmp_path)
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert credentials_source({"KAGGLE_CONFIG_DIR": str(cfg)}, home=tmp_path) == str(cfg / "kaggle.json")
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text("{}")
    with pytest.raises(CredentialsError, match="username"):
        credentials_source({}, home=tmp_path)


@pytest.mark.slow
def test_cli_missing_credentials_exit_2_one_message(tmp_path, python_exe, subprocess_env, repo_root):
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("KAGGLE_")}
    env["HOME"] = str(tmp_path / "home")
    env["KAGGLE_CONFIG_DIR"] = str(tmp_path / "nowhere")
    run = subprocess.run(
        [python_exe, "-m", "sharding", "download", "--out", str(tmp_path / "raw")],
        capture_output=True,
        text=True,
        env=env,
        cwd=repo_root,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and run.stdout == ""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "KAGGLE_USERNAME" in lines[0] and "kaggle.json" in lines[0]
    assert str(tmp_path / "nowhere") in lines[0]
    assert not (tmp_path / "raw").exists()
