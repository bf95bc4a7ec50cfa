"""Labelled image grids (contact sheets) for a person to look at."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def image_grid(
    rows: Sequence[tuple[str, Sequence[np.ndarray]]],
    tile: int = 160,
    label_width: int = 120,
    outlines: Sequence[Sequence[np.ndarray | None]] | None = None,
) -> Image.Image:
    """One row per (label, images); uint8 [H, W] (gray) or [H, W, 3] (RGB) arrays scaled to `tile` pixels.

    `outlines`, parallel to `rows`, may give a binary mask per image whose
    outline is drawn in colour (e.g. the lung mask).
    """
    ncols = max((len(images) for _, images in rows), default=1) or 1
    pad = 4
    sheet = Image.new("RGB", (label_width + ncols * (tile + pad), len(rows) * (tile + pad) + pad), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, (label, images) in enumerate(rows):
        y = pad + r * (tile + pad)
        draw.text((6, y + tile // 2 - 6), label, fill=(255, 255, 255), font=font)
        for c, array in enumerate(images):
            pixels = np.asarray(array, np.uint8).squeeze()
            img = Image.fromarray(pixels, mode="RGB" if pixels.ndim == 3 else "L")
            img = img.resize((tile, tile), Image.Resampling.BILINEAR).convert("RGB")
            mask = outlines[r][c] if outlines is not None else None
            if mask is not None:
                small = (
                    np.asarray(
                        Image.fromarray((np.asarray(mask).squeeze() > 0).astype(np.uint8) * 255).resize(
                            (tile, tile), Image.Resampling.NEAREST
                        )
                    )
                    > 0
                )
                edge = small & ~(
                    np.roll(small, 1, 0) & np.roll(small, -1, 0) & np.roll(small, 1, 1) & np.roll(small, -1, 1)
                )
                pixels = np.asarray(img).copy()
                pixels[edge] = (0, 255, 0)
                img = Image.fromarray(pixels)
            sheet.paste(img, (label_width + c * (tile + pad), y))
    return sheet
