"""`make gpu-check`'s summary: each stage's key figures in one Markdown row, and the JSON beside it."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def headline(name: str, f: dict) -> str:
    """The stage's key figures in one Markdown cell."""
    if name == "phantom":
        return f"{f['films']:,} films"
    if name == "shards":
        return ", ".join(f"{s} {n:,}" for s, n in f["samples"].items()) + f" samples in {f['shards']} shards"
    if name == "pipeline_bench":
        rows = f["img_per_s"]
        return (
            "radstream "
            + ", ".join(f"{k.split('_')[1]}w {v['radstream']:,.0f}" for k, v in rows.items())
            + (" img/s; original " + ", ".join(f"{k.split('_')[1]}w {v['original']:,.0f}" for k, v in rows.items()))
        )
    if name.startswith("train_bench"):
        rate, wait, mem = f["img_per_s"], f["data_wait_frac"], f["peak_mem_bytes"]["model_only"]
        cells = [f"{k} {v:,.0f}" for k, v in rate.items() if v is not None]
        return (
            "img/s " + ", ".join(cells) + f"; radstream/model_only {f['ratios']['radstream_vs_model_only']:.2f}, "
            f"wait {_pct(wait['radstream'])}"
            + ("" if mem is None else f", peak {mem / 2**30:.1f} GiB")
            + "; augment "
            + ", ".join(f"{k} {v:,.0f}" for k, v in f["augment"].items())
            + " img/s"
        )
    if name == "train":
        return "; ".join(
            f"epoch {e['epoch']}: {e['img_per_s']:,.0f} img/s, wait {_pct(e['data_wait_frac'])}, "
            f"val acc {e['val_accuracy']:.3f}"
            for e in f["epochs"]
        )
    if name == "gpu_tests":
        return f"{f['passed']} passed, {f['failures'] + f['errors']} failed, {f['skipped']} skipped"
    return ""


def markdown(results: dict) -> str:
    m = results["machine"]
    verdict = "all stages ok" if results["ok"] else "FAILED"
    lines = [
        f"# gpu-check{' (dry run, CPU)' if results['dry_run'] else ''}: {verdict}",
        "",
        f"{m['device']}, CUDA {m['cuda']}, {m['cpu_count']} CPUs, Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f"; {results['seconds']:.0f} s in all (deadline {results['deadline_s']:.0f} s)",
        "",
        "| stage | ok | seconds | figures |",
        "|---|---|---:|---|",
    ]
    for name, r in results["stages"].items():
        cell = (
            r["skipped"]
            if r.get("skipped") and r["ok"]
            else headline(name, r["figures"])
            if r["ok"]
            else f"**{r['error']}**"
        )
        lines.append(f"| {name} | {'yes' if r['ok'] else 'NO'} | {r['seconds']:.0f} | {cell.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    try:
        text = markdown(results)
    except Exception as exc:  # noqa: BLE001 - the JSON holds the figures; a summary bug must not hide them
        text = f"# gpu-check: summary failed ({type(exc).__name__}: {exc}); see gpu_check.json\n"
    (out / "gpu_check.md").write_text(text)
