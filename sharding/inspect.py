"""Human-readable views of a shard set: a summary table and a PNG grid of samples per class."""

from __future__ import annotations

from pathlib import Path

from sharding.contract import LABEL, SPLITS, image_member, mask_member
from sharding.encode import NO_MASK
from sharding.manifest import Manifest, load_manifest, shards_root
from sharding.verify import decode_member, iter_samples


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _count_table(manifest: Manifest) -> tuple[list[str], list[int], int]:
    """The split x class table (with shards and bytes), the class totals and all bytes."""
    names = list(manifest.classes)
    width = max(len(n) for n in names + ["split"]) + 2

    def row(label: str, counts: list[int], shards: int, nbytes: int) -> str:
        return (
            label.ljust(8)
            + "".join(str(c).rjust(width) for c in counts)
            + str(sum(counts)).rjust(9)
            + str(shards).rjust(8)
            + _mb(nbytes).rjust(13)
        )

    header = "split".ljust(8) + "".join(n.rjust(width) for n in names) + "total".rjust(9)
    header += "shards".rjust(8) + "bytes".rjust(13)
    lines = [header, "-" * len(header)]
    totals = [0] * len(names)
    all_bytes = all_shards = 0
    order = [s for s in SPLITS if s in manifest.splits] + sorted(set(manifest.splits) - set(SPLITS))
    for split in order:
        info = manifest.splits[split]
        nbytes = sum(s.bytes for s in info.shards)
        counts = list(info.class_counts) or [0] * len(names)
        totals = [a + b for a, b in zip(totals, counts)]
        all_bytes += nbytes
        all_shards += len(info.shards)
        lines.append(row(split, counts, len(info.shards), nbytes))
    lines += ["-" * len(header), row("all", totals, all_shards, all_bytes)]
    return lines, totals, all_bytes


def _problem_lines(manifest: Manifest, written: int) -> list[str]:
    """Skipped inputs, mask issues, groups with different labels, and an oversized duplicate group."""
    lines = [f"  skipped {s['path']}: {s['reason']}" for s in manifest.skipped[:10]]
    if len(manifest.skipped) > 10:
        lines.append(f"  ... and {len(manifest.skipped) - 10} more skipped (see manifest.json)")
    filled = bool(manifest.counts.get("masks_predicted"))  # a segmenter filled the films that came without one
    issues = [m for m in manifest.mask_issues if not (filled and m["reason"] == NO_MASK)]
    lines += [f"  mask of {m['path']}: {m['reason']}" for m in issues[:5]]
    groups = manifest.duplicate_groups
    mixed = [g for g in groups if g.get("mixed_labels")]
    for g in mixed[:5]:
        names = sorted(set(g["labels"]))
        members = ", ".join(g["members"][:6]) + (f", ... ({len(g['members'])} images)" if len(g["members"]) > 6 else "")
        lines.append(f"  different labels ({', '.join(names)}) in one {g['kind']} group: {members}")
    if len(mixed) > 5:
        lines.append(f"  ... and {len(mixed) - 5} more groups with different labels (see manifest.json)")
    written_total = max(written, 1)
    for g in groups:
        if len(g["members"]) > max(20, 0.01 * written_total):
            lines.append(
                f"  warning: a {g['kind']} duplicate group holds {len(g['members'])} images "
                f"({len(g['members']) / written_total:.1%}); --near-dup-distance is probably too large"
            )
            break
    return lines


def _mask_fill(manifest: Manifest) -> str:
    """What became of the films without a usable mask: predicted by the segmenter, or all-zero."""
    predicted = manifest.counts.get("masks_predicted")
    if predicted:
        sha = manifest.build["options"]["lung_model"]
        left = len(manifest.mask_issues) - predicted
        return f"{predicted} mask(s) predicted by the lung segmenter {sha[:12]} (json mask_predicted_by)" + (
            f", {left} with an all-zero mask (mask_missing)" if left else ""
        )
    return f"{len(manifest.mask_issues)} sample(s) with an all-zero mask (mask_missing)"


def summary(manifest: Manifest, elapsed: float | None = None) -> str:
    """Split x class counts, skipped inputs, duplicate groups, bytes (and elapsed, if given)."""
    lines, totals, all_bytes = _count_table(manifest)
    c = manifest.counts
    written = sum(totals)
    scanned = c.get("scanned", written + len(manifest.skipped))
    lines.append("")
    lines.append(
        f"encoding {manifest.encoding}, image uint8[1, {manifest.image_size}, {manifest.image_size}], "
        f"masks {'yes' if manifest.masks else 'no'}, seed {manifest.seed}"
    )
    lines.append(
        f"scanned {scanned} = written {written} + skipped {len(manifest.skipped)}"
        + (f"; {_mask_fill(manifest)}" if manifest.masks else "")
    )
    groups = manifest.duplicate_groups
    mixed = [g for g in groups if g.get("mixed_labels")]
    near = [g for g in groups if g.get("kind") == "near"]
    lines.append(
        f"duplicate groups {len(groups)} ({sum(len(g['members']) for g in groups)} images; "
        f"{len(near)} near, {len(mixed)} with different labels)"
    )
    if written:
        lines.append(f"bytes per image {all_bytes / written:,.0f}")
    if elapsed is not None:
        lines.append(f"elapsed {elapsed:.1f}s ({written / max(elapsed, 1e-9):,.0f} img/s)")
    return "\n".join(lines + _problem_lines(manifest, written))


def sample_grid(shards: str | Path, out: str | Path, per_class: int = 6, tile: int = 160) -> Path:
    """Write a PNG with one row per class of the first `per_class` samples found (masks outlined)."""
    from sharding.grid import image_grid

    root = shards_root(shards)
    manifest = load_manifest(root)
    img_ext, mask_ext = image_member(manifest.encoding), mask_member(manifest.encoding)
    images: list[list] = [[] for _ in manifest.classes]
    outlines: list[list] = [[] for _ in manifest.classes]
    done = False
    for split in manifest.splits:
        for shard in manifest.split(split).shards:
            for sample in iter_samples(root / shard.name):
                label = int(sample[LABEL])
                if len(images[label]) >= per_class:
                    continue
                images[label].append(decode_member(img_ext, sample[img_ext])[0])
                outlines[label].append(decode_member(mask_ext, sample[mask_ext])[0] if mask_ext in sample else None)
                if all(len(row) >= per_class for row in images):
                    done = True
                    break
            if done:
                break
        if done:
            break
    rows = [(f"{name} ({i})", images[i]) for i, name in enumerate(manifest.classes)]
    grid = image_grid(rows, tile=tile, label_width=150, outlines=outlines if manifest.masks else None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
