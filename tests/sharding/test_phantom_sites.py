"""The phantom with sites (issue 23): each source acquires in its own style; `--site` makes an unseen hospital."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import numpy as np
import pytest

from sharding import phantom_files as files
from sharding.contract import CLASSES, MASK_SIZE
from sharding.phantom import PhantomSpec, generate, patient_of, render_sample, site_of
from sharding.phantom_sites import STYLES, SiteStyle, acquire, style_for

PLAIN = SiteStyle(1.0, 0.0, 4.0, 1.0, 0, 0, "", 0, 1.0, (0.0, 0.0))


def _style(**change) -> SiteStyle:
    return SiteStyle(**{**PLAIN.__dict__, **change})


def test_acquire_applies_the_tone_curve_and_the_border_by_hand():
    flat = np.full((299, 299), 128.0, np.float32)
    assert np.all(acquire(flat, PLAIN) == 128)
    assert np.all(acquire(flat, _style(gamma=2.0)) == round(255 * (128 / 255) ** 2))  # 64
    assert np.all(acquire(flat, _style(gamma=0.5)) == round(255 * (128 / 255) ** 0.5))  # 181
    framed = acquire(flat, _style(border=10, border_level=255))
    assert np.all(framed[:10] == 255) and np.all(framed[-10:] == 255) and np.all(framed[:, :10] == 255)
    assert np.all(framed[:, -10:] == 255) and np.all(framed[10:-10, 10:-10] == 128)


def _high_frequency(image: np.ndarray) -> float:
    x = image.astype(np.float64)[20:-20, 20:-20]
    return float(np.abs(4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]).mean())


def test_blur_and_resampling_remove_detail_and_sharpening_adds_it():
    noise = np.random.default_rng(0).normal(128, 20, (299, 299)).astype(np.float32)
    plain = _high_frequency(acquire(noise, PLAIN))
    assert _high_frequency(acquire(noise, _style(blur=1.2))) < 0.5 * plain
    assert _high_frequency(acquire(noise, _style(resample=0.5))) < 0.7 * plain
    smooth = np.asarray(acquire(noise, _style(blur=1.5)), np.float32)
    assert _high_frequency(acquire(smooth, _style(blur=-1.0))) > 1.5 * _high_frequency(acquire(smooth, PLAIN))


def test_the_tag_is_burned_in_its_corner_inside_the_border():
    flat = np.zeros((299, 299), np.float32)
    for corner in range(4):
        out = acquire(flat, _style(tag="SITE", tag_corner=corner, border=6))
        ys, xs = np.nonzero(out)
        top, left = corner < 2, corner % 2 == 0
        assert (ys.max() < 60) == top and (ys.min() > 239) == (not top)
        assert (xs.max() < 80) == left and (xs.min() > 219) == (not left)
        assert ys.min() >= 10 and xs.min() >= 10 and ys.max() <= 288 and xs.max() <= 288


def _centroid_and_area(mask: np.ndarray) -> tuple[np.ndarray, int]:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()]), len(xs)


@pytest.mark.parametrize("source", sorted(STYLES))
def test_each_source_films_in_its_style_and_the_mask_follows_the_patient(source):
    """The same film drawn plain and styled: the lungs move by the site's shift and scale by its zoom (the lungs
    and the heart scale about their own centres, so the lung field's centroid and area follow within a little)."""
    plain_spec = PhantomSpec(counts=(60,) * 4, seed=0)
    styled_spec = PhantomSpec(counts=(60,) * 4, seed=0, site_styles=True)
    cls, index = next(
        (c, i) for c in range(4) for i in range(60) if files.source_of(0, CLASSES[c], i) == source and i > 0
    )
    assert site_of(styled_spec, cls, index) == source
    style = STYLES[source]
    plain_image, plain_mask = render_sample(plain_spec, cls, index)
    image, mask = render_sample(styled_spec, cls, index)
    (c0, a0), (c1, a1) = _centroid_and_area(plain_mask), _centroid_and_area(mask)
    scale = MASK_SIZE / 299
    assert np.allclose(c1 - c0, np.array(style.shift) * scale, atol=2.5)
    assert abs(a1 / a0 - style.zoom**2) < 0.05 and np.sign(a1 / a0 - 1) == np.sign(round(style.zoom - 1, 6))
    if style.border:
        assert np.all(image[: style.border] == style.border_level)
    assert not np.array_equal(image, plain_image)


def test_a_new_site_has_every_class_its_own_patients_and_films(tmp_path):
    spec = PhantomSpec(counts=(5, 4, 6, 3), seed=0, site="hospital-x.example")
    root = generate(tmp_path, spec)
    with open(root / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [sum(r["label"] == c for r in rows) for c in CLASSES] == [5, 4, 6, 3]
    assert {r["source"] for r in rows} == {"hospital-x.example"}
    assert all(re.fullmatch(r"HOSPITAL\d{6}-[A-Z]+\d{5}", r["patient_id"]) for r in rows), rows[0]["patient_id"]
    other = PhantomSpec(counts=(5, 4, 6, 3), seed=0, site="hospital-y.example")  # the same first 8 letters
    assert {patient_of(spec, 0, 0)} != {patient_of(other, 0, 0)}  # other patients
    assert not np.array_equal(render_sample(spec, 0, 0)[0], render_sample(other, 0, 0)[0])
    default = PhantomSpec(counts=(5, 4, 6, 3), seed=0)
    for cls in range(4):  # other patients: no film is the default phantom's, even in the same style
        same_style = PhantomSpec(counts=(5, 4, 6, 3), seed=0, site_styles=True)
        for index in range(3):
            film = render_sample(spec, cls, index)[0]
            assert not np.array_equal(film, render_sample(default, cls, index)[0])
            assert not np.array_equal(film, render_sample(same_style, cls, index)[0])


def test_a_new_sites_style_is_fixed_by_its_name_and_differs_by_name():
    a, b = style_for("hospital-x.example"), style_for("hospital-y.example")
    assert a == style_for("hospital-x.example") and a != b
    for style in (a, b, style_for("z")):
        assert 0.6 <= style.gamma <= 0.8 or 1.25 <= style.gamma <= 1.5  # clearly off the identity curve
        assert 0.35 <= style.resample <= 0.8 and 0 <= style.border < 24 and style.border_level in (0, 255)
        assert 0.88 <= style.zoom <= 1.08 and all(-8 <= s <= 8 for s in style.shift)


def test_the_default_phantom_and_its_stamp_are_unchanged_by_the_site_fields(tmp_path):
    """Adding the site fields kept the default phantom (its pixels are pinned in test_phantom.py) and its stamp."""
    root = generate(tmp_path, PhantomSpec(counts=(2, 2, 2, 2), seed=0))
    stamp = (root / ".phantom.json").read_text()
    assert "site" not in stamp and "site" not in (root / "README.md.txt").read_text()
    root = generate(tmp_path / "s", PhantomSpec(counts=(2, 2, 2, 2), seed=0, site_styles=True))
    assert '"site_styles": true' in (root / ".phantom.json").read_text()


@pytest.mark.parametrize("name", ["", "  ", "a,b", "tab\there"])
def test_a_bad_site_name_is_refused_with_exit_2(name, tmp_path, subprocess_env):
    cmd = [sys.executable, "-m", "sharding", "phantom", "--out", str(tmp_path), "--per-class", "1", "--site", name]
    done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "site must be a printable name" in done.stderr and "Traceback" not in done.stderr
