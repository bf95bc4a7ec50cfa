"""Fetch the COVID-19 Radiography Database from Kaggle into `data/raw`.

The download goes to a temporary folder next to the target, the zip is
extracted there (refusing absolute paths, `..`, links and special files) and
the dataset folder is renamed into place only when complete. Re-running when
the dataset is there does nothing.

`kaggle` is imported lazily, inside the function: some versions authenticate
(and exit on missing credentials) at import time.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from sharding.contract import CLASSES, DATASET_DIR

DATASET = "tawsifurrahman/covid19-radiography-database"


class CredentialsError(RuntimeError):
    """No Kaggle credentials; the message says how to provide them."""


class DownloadError(RuntimeError):
    """The download or the archive is unusable; the message says why."""


def credentials_source(environ: dict[str, str] | None = None, home: Path | None = None) -> str:
    """Where the Kaggle credentials come from, or CredentialsError explaining how to provide them."""
    env = os.environ if environ is None else environ
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "environment (KAGGLE_USERNAME/KAGGLE_KEY)"
    config_dir = Path(env["KAGGLE_CONFIG_DIR"]) if env.get("KAGGLE_CONFIG_DIR") else (home or Path.home()) / ".kaggle"
    path = config_dir / "kaggle.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CredentialsError(
                f"{path} is not readable JSON ({exc}); download a fresh one from "
                "https://www.kaggle.com/settings (API > Create New Token)"
            ) from None
        if isinstance(data, dict) and data.get("username") and data.get("key"):
            return str(path)
        raise CredentialsError(
            f'{path} lacks "username" and "key"; download a fresh one from '
            "https://www.kaggle.com/settings (API > Create New Token)"
        )
    raise CredentialsError(
        "no Kaggle credentials found. Either export KAGGLE_USERNAME and KAGGLE_KEY, or save the token from "
        f"https://www.kaggle.com/settings (API > Create New Token) as {path} (chmod 600); "
        "set KAGGLE_CONFIG_DIR to use another folder. No account? `python -m sharding phantom` makes "
        "synthetic data in the same layout."
    )


def _default_api():
    from kaggle.api.kaggle_api_extended import KaggleApi  # lazy: may authenticate at import

    return KaggleApi()


def safe_extract(archive: Path, dest: Path) -> int:
    """Extract a zip into `dest`, refusing absolute paths, `..`, links and special files. Returns files written."""
    dest = dest.resolve()
    n = 0
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:  # check everything before writing anything
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
                raise DownloadError(f"refusing archive member with an unsafe path: {name!r}")
            kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0  # 3: Unix
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise DownloadError(f"refusing archive member that is a link or special file: {name!r}")
            target = (dest / Path(*parts)).resolve() if parts else dest
            if target != dest and dest not in target.parents:
                raise DownloadError(f"refusing archive member outside the target folder: {name!r}")
        for info in infos:
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if not parts:
                continue
            target = dest / Path(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            n += 1
    return n


def _find_dataset(folder: Path) -> Path | None:
    if (folder / DATASET_DIR).is_dir():
        return folder / DATASET_DIR
    for path in sorted(folder.rglob(DATASET_DIR)):
        if path.is_dir():
            return path
    if any((folder / c).is_dir() for c in CLASSES):
        return folder
    return None


def download(
    out: str | Path = "data/raw",
    *,
    dataset: str = DATASET,
    api_factory: Callable[[], object] | None = None,
    environ: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Path, bool]:
    """Make sure `out/COVID-19_Radiography_Dataset` exists; returns (its path, whether it was downloaded).

    `api_factory` builds the Kaggle API object (tests pass a fake); it needs
    `authenticate()` and `dataset_download_files(dataset, path=..., unzip=False, quiet=...)`.
    """
    out = Path(out)
    target = out / DATASET_DIR
    if target.is_dir() and any((target / c).is_dir() for c in CLASSES):
        return target, False
    if api_factory is None:
        credentials_source(environ)  # raises CredentialsError before touching the kaggle package
        api_factory = _default_api
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".download-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        api = api_factory()
        api.authenticate()
        log(f"download: fetching {dataset} from Kaggle into {tmp} ...")
        api.dataset_download_files(dataset, path=str(tmp / "zip"), unzip=False, quiet=False)
        zips = sorted((tmp / "zip").glob("*.zip"))
        if not zips:
            raise DownloadError(f"the Kaggle API wrote no zip for {dataset} into {tmp / 'zip'}")
        extracted = tmp / "extracted"
        extracted.mkdir()
        for archive in zips:
            try:
                n = safe_extract(archive, extracted)
            except zipfile.BadZipFile as exc:
                raise DownloadError(f"{archive.name} is not a valid zip: {exc}") from None
            log(f"download: extracted {n} files from {archive.name}")
        found = _find_dataset(extracted)
        if found is None:
            raise DownloadError(f"the archive holds no {DATASET_DIR}/ folder with class folders {list(CLASSES)}")
        if target.exists():  # an incomplete folder from elsewhere: keep it aside rather than delete it
            target.rename(out / f".{DATASET_DIR}.incomplete-{os.getpid()}")
        os.rename(found, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, True
