"""The structure check: it passes on this tree and names a module or function over its limit; the import
contracts (import-linter) hold and catch an import against the flow."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tools import structure

ROOT = Path(__file__).resolve().parents[2]


def test_this_tree_is_within_the_limits():
    problems, sizes = structure.offenders(ROOT, 450, 80)
    assert problems == [] and len(sizes) > 50


def test_an_oversized_module_and_function_are_named(tmp_path):
    pkg = tmp_path / "train"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    (pkg / "big.py").write_text(f"def long_one():\n{body}\n" + "\n" * 400)
    problems, _ = structure.offenders(tmp_path, 450, 80)
    assert problems == ["module train/big.py has 482 lines > 450", "function train/big.py:1 long_one has 82 lines > 80"]
    assert structure.main(["--root", str(tmp_path)]) == 1


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe) if exe.exists() else "lint-imports", "--no-cache"], cwd=root, capture_output=True, text=True
    )


def test_import_contracts_hold_and_catch_train_importing_evaluation(tmp_path):
    done = _lint_imports(ROOT)
    assert done.returncode == 0 and "Contracts: 2 kept, 0 broken." in done.stdout, done.stdout[-2000:]
    copy = tmp_path / "tree"
    for name in ("sharding", "pipeline", "train", "evaluation", "tools", "pyproject.toml"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / name if src.is_dir() else copy)
    with open(copy / "train" / "loop.py", "a") as fh:
        fh.write("\nfrom evaluation.statistics import metrics  # noqa: E402, F401\n")
    broken = _lint_imports(copy)
    assert broken.returncode != 0 and "train.loop -> evaluation.statistics.metrics" in broken.stdout
