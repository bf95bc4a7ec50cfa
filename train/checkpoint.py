"""Checkpoints and best-model files: atomic writes, safe loads, compatibility checks.

Everything is written to a temporary name in the target folder, fsynced and
renamed, so a process killed mid-write leaves the previous file intact.
Everything is read with `torch.load(weights_only=True)`: a checkpoint can
never execute code.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from sharding.files import atomic_write, atomic_write_all, clean_stale_temporaries  # noqa: F401 (re-exported to train)

CHECKPOINT = "checkpoint.pth"
BEST_PTH = "best_model.pth"
BEST_SAFETENSORS = "best_model.safetensors"
BEST_JSON = "best_model.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, unsafe, or from another model/config."""


def _torch_save(obj: Any, tmp: Path) -> None:
    """torch.save through a Python file, so a failed write (disk full, EFBIG) surfaces as the OSError it is.

    torch's C++ writer reports it as a RuntimeError ("unexpected pos ..."), with the
    OSError of our file object as its context.
    """
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
    except RuntimeError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError):
            raise cause from exc
        raise OSError(errno.EIO, f"torch.save failed ({str(exc).splitlines()[0][:200]})", str(tmp)) from exc


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: _torch_save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; refuses pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"refusing to load {path}: not a plain-tensor checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from None


def check_compatible(found: dict[str, Any], expected: dict[str, Any], path: str | Path) -> None:
    """Refuse a resume whose model identity (name, classes, size...) differs from this run's."""
    diffs = [
        f"{k}: checkpoint has {found.get(k)!r}, this run has {v!r}" for k, v in expected.items() if found.get(k) != v
    ]
    if diffs:
        raise CheckpointError(f"cannot resume from {path}, it was made for another model/config: " + "; ".join(diffs))


def save_best_model(models_dir: Path, state_dict: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """best_model.pth (weights only) + .safetensors + .json (config, epoch, metric, classes).

    The three are renamed into place together, and the .json records the other
    two's sha256: a reader can tell a set mixed by a kill between the renames.
    """
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    weights = {BEST_SAFETENSORS: safetensors_bytes(cpu)}
    buf = io.BytesIO()
    torch.save(cpu, buf)
    weights[BEST_PTH] = buf.getvalue()
    info = {**info, "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in weights.items()}}
    text = json.dumps(info, indent=2, sort_keys=True)
    writes = {models_dir / name: (lambda tmp, data=data: tmp.write_bytes(data)) for name, data in weights.items()}
    writes[models_dir / BEST_JSON] = lambda tmp: tmp.write_text(text)
    atomic_write_all(writes)


def load_best_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, info) from best_model.pth/.safetensors and the .json beside it."""
    path = Path(path)
    info_path = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"no model file at {path}")
    if not info_path.is_file():
        raise CheckpointError(f"{info_path} is missing: it records the model name, classes and image size")
    info = json.loads(info_path.read_text())
    expected = info.get("sha256", {}).get(path.name)
    if expected is not None and hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        raise CheckpointError(
            f"{path} does not match {info_path.name} (sha256 differs): the files come from different saves "
            f"(a run killed while writing them?). Resume the run (train.resume=auto) to rewrite them."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), info
    state = load_checkpoint(path)
    return state, info
