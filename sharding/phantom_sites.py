"""Acquisition styles per site for the phantom: what makes films from one hospital look alike.

Real collections differ by site far more than by disease: tone curve, sharpness, film grain, the resolution
a film went through, collimation borders, burned-in text, how patients are zoomed and placed. A model
trained where each class comes from its own sites learns the site (DeGrave et al. 2021). With
`PhantomSpec.site_styles`, each source of the phantom gets one fixed style (`STYLES`), so class and style
are correlated as in the DB; `PhantomSpec.site` renders every film (all classes) in the style of a new site,
drawn from the same ranges by its name: the unseen hospital of an external test.

A style changes only how a film is acquired, never its anatomy's class pattern; the lung mask follows the
zoom and the position, so masks stay true.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from sharding.contract import IMAGE_SIZE


@dataclass(frozen=True)
class SiteStyle:
    """How one site acquires films."""

    gamma: float  # tone curve: out = in ** gamma on [0, 1]
    blur: float  # Gaussian blur radius in px (0: none); negative: unsharp masking of that strength
    grain: float  # film grain, standard deviation in grey levels (the default phantom has 4)
    resample: float  # the film went through this fraction of its resolution and back (1: untouched)
    border: int  # collimation border width in px (0: none)
    border_level: int  # the border's grey level (0 black, 255 white)
    tag: str  # burned-in text
    tag_corner: int  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
    zoom: float  # patient scale (anatomy size)
    shift: tuple[float, float]  # patient position offset (x, y) in px


#: One style per phantom source (`sharding.phantom_files.SOURCES`): deliberately far apart.
STYLES: dict[str, SiteStyle] = {
    "bimcv.example/covid19": SiteStyle(0.75, 1.2, 6.0, 0.5, 12, 0, "BIMCV", 0, 1.04, (6.0, -4.0)),
    "sirm.example/covid-19": SiteStyle(1.35, 0.0, 3.0, 0.7, 0, 0, "SIRM", 3, 0.94, (-5.0, 5.0)),
    "github.example/ieee8023/covid-chestxray-dataset": SiteStyle(
        1.1, -1.0, 8.0, 0.4, 20, 255, "CASE", 1, 1.0, (0.0, 8.0)
    ),
    "rsna.example/pneumonia-detection-challenge": SiteStyle(1.0, 0.6, 4.0, 0.85, 0, 0, "RSNA", 2, 0.98, (3.0, 0.0)),
    "pediatric.example/chest-xray-pneumonia": SiteStyle(0.9, -0.6, 5.0, 1.0, 6, 0, "R", 0, 0.88, (-6.0, -6.0)),
}


def site_number(site: str) -> int:
    """A 64-bit number for a site's name (its whole name: sites sharing a prefix still differ)."""
    return int.from_bytes(hashlib.sha256(site.encode()).digest()[:8], "little")


def style_for(site: str) -> SiteStyle:
    """The style of `site`: a phantom source's fixed one, else one drawn from the same ranges by its name."""
    if site in STYLES:
        return STYLES[site]
    rng = np.random.default_rng(site_number(site))
    return SiteStyle(
        gamma=float(rng.choice([rng.uniform(0.6, 0.8), rng.uniform(1.25, 1.5)])),
        blur=float(rng.choice([rng.uniform(0.8, 1.6), -rng.uniform(0.6, 1.2)])),
        grain=float(rng.uniform(2.0, 9.0)),
        resample=float(rng.uniform(0.35, 0.8)),
        border=int(rng.integers(0, 24)),
        border_level=int(rng.choice([0, 255])),
        tag=site.split(".")[0].upper()[:8] or "SITE",
        tag_corner=int(rng.integers(0, 4)),
        zoom=float(rng.uniform(0.88, 1.08)),
        shift=(float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8))),
    )


def acquire(image: np.ndarray, style: SiteStyle) -> np.ndarray:
    """The film (float grey levels, [299, 299]) as `style`'s site would store it: uint8 [299, 299]."""
    img = np.clip(image, 0.0, 255.0) / 255.0
    img = 255.0 * img ** np.float32(style.gamma)
    film = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="L")
    if style.blur > 0:
        film = film.filter(ImageFilter.GaussianBlur(style.blur))
    elif style.blur < 0:
        film = film.filter(ImageFilter.UnsharpMask(radius=2, percent=int(150 * -style.blur), threshold=0))
    if style.resample < 1.0:
        small = max(8, round(IMAGE_SIZE * style.resample))
        film = film.resize((small, small), Image.Resampling.BILINEAR).resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR
        )
    out = np.asarray(film, np.uint8).copy()
    if style.border:
        b = style.border
        out[:b], out[-b:], out[:, :b], out[:, -b:] = (style.border_level,) * 4
    _burn_tag(out, style)
    return out


def _burn_tag(out: np.ndarray, style: SiteStyle) -> None:
    patch = Image.new("L", (len(style.tag) * 6 + 2, 12), 0)
    ImageDraw.Draw(patch).text((1, 0), style.tag, fill=255, font=ImageFont.load_default())
    tag = np.asarray(patch.resize((patch.width * 2, 24), Image.Resampling.NEAREST), np.uint8)
    h, w = tag.shape
    margin = style.border + 4
    y0 = margin if style.tag_corner < 2 else IMAGE_SIZE - margin - h
    x0 = margin if style.tag_corner % 2 == 0 else IMAGE_SIZE - margin - w
    region = out[y0 : y0 + h, x0 : x0 + w]
    np.maximum(region, (tag.astype(np.float32) * 0.95).astype(np.uint8), out=region)


__all__ = ["STYLES", "SiteStyle", "acquire", "site_number", "style_for"]
