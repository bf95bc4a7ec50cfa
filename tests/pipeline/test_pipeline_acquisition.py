"""Acquisition-robust augmentation and the lung crop (issue 23): parameter statistics, oracles by hand,
determinism, and the seed recipe unchanged when they are off."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.acquisition import (
    RESAMPLE_LEVELS,
    AcquisitionRanges,
    acquire,
    blur_batch,
    resample_batch,
    sample_acquisition,
    zoom_shift_matrices,
)
from pipeline.augment import MEAN_1CH, STD_1CH, DeviceAugment, affine_matrices, sample_params, warp_torch
from pipeline.crop import crop_matrices, lung_boxes

ALL = AcquisitionRanges(
    gamma=0.4, contrast=0.3, brightness=0.1, blur=1.0, noise=0.05, resample=0.6, zoom=0.1, shift=0.05
)


def _unnorm(y):
    return y * STD_1CH + MEAN_1CH


def test_parameter_ranges_and_rates():
    p = sample_acquisition(20000, ALL, torch.Generator().manual_seed(0), torch.device("cpu"))
    log_gamma = p["gamma"].log()
    assert log_gamma.min() >= -0.4 - 1e-6 and log_gamma.max() <= 0.4 + 1e-6 and abs(float(log_gamma.mean())) < 0.01
    assert log_gamma.min() < -0.39 and log_gamma.max() > 0.39  # the whole range is used
    for name, lo, hi in [("contrast", 0.7, 1.3), ("brightness", -0.1, 0.1), ("blur", -1.0, 1.0), ("noise", 0, 0.05)]:
        v = p[name]
        span = hi - lo
        assert v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6, name
        assert abs(float(v.mean()) - (lo + hi) / 2) < 0.01 * span, name  # uniform: centred
        assert abs(float(v.std()) - span / math.sqrt(12)) < 0.01 * span, name  # and flat
    levels = [1.0 - i * 0.6 / (RESAMPLE_LEVELS - 1) for i in range(RESAMPLE_LEVELS)]
    shares = [float(((p["resample"] - lv).abs() < 1e-5).float().mean()) for lv in levels]
    assert sum(shares) == pytest.approx(1.0)  # always one of the levels
    assert shares == pytest.approx([1 / 6, 1 / 3, 1 / 3, 1 / 6], abs=0.015)  # rounding a uniform draw
    assert float((p["zoom"] - 1).abs().max()) <= 0.1 + 1e-6 and float(p["shift_x"].abs().max()) <= 0.05 + 1e-6
    assert abs(float(torch.corrcoef(torch.stack([p["shift_x"], p["shift_y"]]))[0, 1])) < 0.03  # independent


def test_each_parameter_is_its_formula_of_the_generators_draws_in_a_fixed_order():
    """An oracle from torch.rand itself: which draw feeds which parameter, and each affine map (a sign or an
    order flipped keeps the statistics above, not these values)."""
    b = 5
    u = torch.rand(9 * b, generator=torch.Generator().manual_seed(11)).reshape(9, b)
    p = sample_acquisition(b, ALL, torch.Generator().manual_seed(11), torch.device("cpu"))
    step = 0.6 / (RESAMPLE_LEVELS - 1)
    expected = {
        "gamma": torch.exp(u[0] * 0.8 - 0.4),
        "contrast": 1.0 + (u[1] * 0.6 - 0.3),
        "brightness": u[2] * 0.2 - 0.1,
        "blur": u[3] * 2.0 - 1.0,
        "noise": u[4] * 0.05,
        "resample": 1.0 - torch.round((1.0 - (u[5] * 0.6 + 0.4)) / step) * step,
        "zoom": 1.0 + (u[6] * 0.2 - 0.1),
        "shift_x": u[7] * 0.1 - 0.05,
        "shift_y": u[8] * 0.1 - 0.05,
    }
    assert list(p) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(p[name], value, atol=1e-6, rtol=0, msg=name)
        assert p[name].dtype == torch.float32 and p[name].shape == (b,)


def test_only_the_transforms_that_are_on_are_drawn():
    g = torch.Generator().manual_seed(0)
    assert sample_acquisition(4, AcquisitionRanges(), g, torch.device("cpu")) == {}
    assert set(sample_acquisition(4, AcquisitionRanges(noise=0.1), g, torch.device("cpu"))) == {"noise"}
    assert AcquisitionRanges().active() == {} and not AcquisitionRanges().intensity
    assert ALL.intensity and ALL.geometry and AcquisitionRanges(zoom=0.1).active() == {"zoom": 0.1}


@pytest.mark.parametrize(
    "bad",
    [
        {"gamma": -0.1},
        {"contrast": 1.0},
        {"resample": 1.0},
        {"zoom": 1.5},
        {"shift": 0.5},
        {"noise": math.nan},
        {"blur": 4 / 3},  # sigma (BLUR_TAPS - 1) / 6: the kernel would no longer cover +/- 3 sigma
    ],
)
def test_out_of_range_ranges_are_refused_naming_the_key(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        AcquisitionRanges(**bad)


def test_each_range_just_below_its_limit_is_taken():
    ranges = AcquisitionRanges(contrast=0.99, resample=0.99, zoom=0.99, blur=1.33, shift=0.49)
    assert ranges.active() == {"contrast": 0.99, "blur": 1.33, "resample": 0.99, "zoom": 0.99, "shift": 0.49}


def _params(**values) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([v], dtype=torch.float32) for k, v in values.items()}


def test_tone_contrast_and_brightness_by_hand():
    flat = torch.full((1, 1, 8, 8), 0.25)
    torch.testing.assert_close(acquire(flat, _params(gamma=2.0), ALL, None), torch.full_like(flat, 0.0625))
    ramp = torch.linspace(0.2, 0.6, 64).view(1, 1, 8, 8)
    out = acquire(ramp, _params(contrast=1.5, brightness=0.05), ALL, None)
    torch.testing.assert_close(out, (ramp - ramp.mean()) * 1.5 + ramp.mean() + 0.05)
    assert float(acquire(ramp, _params(brightness=0.9), ALL, None).max()) == 1.0  # clipped to [0, 1]


def test_blur_sharpen_and_resampling():
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand((2, 1, 32, 32), generator=gen)
    flat = torch.full((2, 1, 32, 32), 0.3)
    torch.testing.assert_close(blur_batch(flat, torch.tensor([0.5, 1.3])), flat)  # a constant stays constant
    blurred = blur_batch(noise, torch.tensor([0.0, 1.2]))
    torch.testing.assert_close(blurred[0], noise[0], atol=1e-6, rtol=0)  # sigma 0: untouched
    assert float(blurred[1].std()) < 0.5 * float(noise[1].std())
    one = blur_batch(noise[:1], torch.tensor([1.0]))
    sharpened = acquire(one, _params(blur=-1.0), ALL, None)
    assert float(sharpened.std()) > float(one.std())
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float().view(1, 1, 32, 32)
    levels = [1.0, 0.5]
    torch.testing.assert_close(resample_batch(checker, torch.tensor([1.0]), levels), checker)
    assert float(resample_batch(checker, torch.tensor([0.5]), levels).std()) < 0.1  # fine detail gone


def test_grain_has_the_drawn_standard_deviation():
    flat = torch.full((2, 1, 128, 128), 0.5)
    out = acquire(flat, {"noise": torch.tensor([0.02, 0.06])}, ALL, torch.Generator().manual_seed(0))
    assert float((out[0] - 0.5).std()) == pytest.approx(0.02, rel=0.05)
    assert float((out[1] - 0.5).std()) == pytest.approx(0.06, rel=0.05)


def test_zoom_and_shift_matrices_by_hand():
    m = zoom_shift_matrices(_params(zoom=2.0, shift_x=0.1, shift_y=-0.2), 11, 21)
    cx, cy = 10.0, 5.0
    expected = torch.tensor([[2.0, 0.0, cx - 2 * cx + 2.1], [0.0, 2.0, cy - 2 * cy - 2.2], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(m[0], expected)
    assert zoom_shift_matrices({}, 11, 21) is None
    # either one alone (its range on, the other's 0: the other is not drawn at all)
    zoom = zoom_shift_matrices({"zoom": torch.tensor([2.0])}, 11, 21)
    torch.testing.assert_close(zoom[0], torch.tensor([[2.0, 0.0, -cx], [0.0, 2.0, -cy], [0.0, 0.0, 1.0]]))
    shift = zoom_shift_matrices({"shift_x": torch.tensor([0.1]), "shift_y": torch.tensor([-0.2])}, 11, 21)
    torch.testing.assert_close(shift[0], torch.tensor([[1.0, 0.0, 2.1], [0.0, 1.0, -2.2], [0.0, 0.0, 1.0]]))
    assert zoom.dtype == shift.dtype == torch.float32


def test_off_by_default_the_train_augment_is_the_seed_recipes():
    """No acquisition key set: the same draws and the same pixels as flip + rotation alone (the old chain)."""
    x = torch.randint(0, 256, (6, 1, 20, 30), dtype=torch.uint8)
    out, _ = DeviceAugment(train=True, image_size=16)(x, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    p = sample_params(6, rotation_degrees=10.0, hflip_p=0.5, generator=g)
    warped, _ = warp_torch(x.float() / 255, None, affine_matrices(p["flip"], p["angle"], 20, 30))
    import torch.nn.functional as F

    old = F.interpolate(warped, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(_unnorm(out), old, atol=1e-6, rtol=0)


def test_the_acquisition_draws_come_after_the_flip_and_rotation_and_are_deterministic():
    x = torch.randint(0, 256, (8, 1, 24, 24), dtype=torch.uint8)
    plain, robust = DeviceAugment(train=True), DeviceAugment(train=True, acquisition=ALL)
    plain(x, generator=torch.Generator().manual_seed(5))
    a, _ = robust(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain.last_params["flip"], robust.last_params["flip"])
    assert torch.equal(plain.last_params["angle"], robust.last_params["angle"])
    b, _ = robust(x, generator=torch.Generator().manual_seed(5))
    c, _ = robust(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(robust.last_params) >= {"gamma", "contrast", "brightness", "blur", "noise", "resample", "zoom"}


def test_zoom_and_shift_move_image_and_mask_together():
    x = torch.zeros(16, 1, 40, 40, dtype=torch.uint8)
    x[:, :, 12:28, 8:20] = 255
    aug = DeviceAugment(train=True, rotation_degrees=0, hflip_p=0, acquisition=AcquisitionRanges(zoom=0.3, shift=0.2))
    y, m = aug(x, (x > 0).to(torch.uint8), generator=torch.Generator().manual_seed(0))
    bright = _unnorm(y) > 0.5
    assert float((bright == (m > 0.5)).float().mean()) > 0.98  # the mask still marks the bright block
    assert len({int(v) for v in (m > 0.5).sum(dim=(1, 2, 3))}) > 4  # and blocks of many sizes and places


def test_eval_never_augments_acquisition():
    x = torch.randint(0, 256, (3, 1, 12, 12), dtype=torch.uint8)
    y, _ = DeviceAugment(train=False, acquisition=ALL)(x)
    torch.testing.assert_close(y, (x.float() / 255 - MEAN_1CH) / STD_1CH)


# --------------------------------------------------------------------------- lung crop


def test_lung_boxes_by_hand():
    m = torch.zeros(3, 1, 100, 80)
    m[0, 0, 30:60, 20:40] = 1  # box x 20..39, y 30..59: 30 tall, 19 wide -> a square of side 29 * 1.2
    m[1, 0, 0:10, 70:80] = 1  # in a corner: the square moves inside the film
    boxes = lung_boxes(m, margin=0.1)
    side = 29 * 1.2
    torch.testing.assert_close(
        boxes[0], torch.tensor([29.5 - side / 2, 44.5 - side / 2, 29.5 + side / 2, 44.5 + side / 2])
    )
    assert float(boxes[1, 2]) == pytest.approx(79.0) and float(boxes[1, 1]) == pytest.approx(0.0)
    assert boxes[2].tolist() == [0.0, 0.0, 79.0, 99.0]  # no lungs: the whole film


def test_lung_boxes_at_every_edge_and_the_frame_cap_by_hand():
    """Squares moved inside the film at each edge (centre clipped to side/2 .. last - side/2), the one-pixel
    lung in the first row and column, and a square larger than the film capped at its shorter side minus one."""
    h, w = 40, 60
    m = torch.zeros(5, 1, h, w)
    m[0, 0, 30:40, 25:35] = 1  # at the bottom: side 9 * 2 = 18, centre y 34.5 -> 39 - 9 = 30
    m[1, 0, 10:20, 0:10] = 1  # at the left: centre x 4.5 -> 9
    m[2, 0, 0, 0] = 1  # one pixel in the corner: a zero-size box at (0, 0)
    m[3, 0, 5:35, 5:55] = 1  # 50 wide, x 1.5 = 73.5: capped at 39, centred at (29.5, 19.5)
    m[4, 0, 0:4, 56:60] = 1  # top right: side 6, centre (57.5, 1.5) -> (56, 3)
    boxes = lung_boxes(m, margin=0.5)
    expected = torch.tensor(
        [
            [29.5 - 9, 30 - 9, 29.5 + 9, 39.0],
            [0.0, 14.5 - 9, 18.0, 14.5 + 9],
            [0.0, 0.0, 0.0, 0.0],
            [29.5 - 19.5, 0.0, 29.5 + 19.5, 39.0],
            [53.0, 0.0, 59.0, 6.0],
        ]
    )
    torch.testing.assert_close(boxes, expected)


def test_a_degenerate_box_still_gives_a_finite_matrix_of_the_right_shape():
    m = crop_matrices(torch.tensor([[5.0, 7.0, 5.0, 7.0]]), 30, 20)
    assert m.shape == (1, 3, 3) and m.dtype == torch.float32
    torch.testing.assert_close(m[0], torch.tensor([[19.0, 0.0, -95.0], [0.0, 29.0, -203.0], [0.0, 0.0, 1.0]]))


def test_crop_matrices_take_the_box_onto_the_frame():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 70.0]])
    m = crop_matrices(boxes, 60, 40)[0]
    corners = torch.tensor([[10.0, 20.0, 1.0], [50.0, 70.0, 1.0]]).T
    torch.testing.assert_close((m @ corners)[:2].T, torch.tensor([[0.0, 0.0], [39.0, 59.0]]))


def test_the_crop_is_the_same_in_training_and_evaluation_and_frames_the_lungs():
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    masks[0, 0, 20:44, 16:40] = 1
    masks[1, 0, 8:56, 4:60] = 1
    train = DeviceAugment(train=True, rotation_degrees=0, hflip_p=0, crop="lungs", crop_margin=0.1)
    evaluate = DeviceAugment(train=False, crop="lungs", crop_margin=0.1)
    a, ma = train(x, masks, generator=torch.Generator().manual_seed(0))
    b, mb = evaluate(x, masks)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    rows = (mb[0, 0] > 0.5).any(dim=1).nonzero().flatten()
    assert int(rows[0]) in (5, 6) and int(rows[-1]) in (57, 58)  # the lungs span 1/1.2 of the frame
    with pytest.raises(ValueError, match="crop=lungs need masks"):
        evaluate(x)


@pytest.mark.parametrize("crop", ["none", "lungs"])
def test_the_whole_chain_builds_no_tensor_from_host_data(monkeypatch, crop):
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    aug = DeviceAugment(train=True, acquisition=ALL, crop=crop, image_size=12)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.tensor called inside the training augmentation")

    monkeypatch.setattr(torch, "tensor", refuse)
    aug(x, x.clamp(max=1), generator=torch.Generator().manual_seed(0))


def test_tiny_films_blur_and_a_cpu_generator_serves_any_device():
    x = torch.rand(2, 1, 3, 3)
    assert blur_batch(x, torch.tensor([1.0, 0.5])).shape == x.shape  # smaller than the kernel
    flat = torch.full((1, 1, 3, 3), 0.4)
    torch.testing.assert_close(blur_batch(flat, torch.tensor([1.2])), flat)
    g = torch.Generator(device="cpu").manual_seed(0)
    p = sample_acquisition(4, ALL, g, torch.device("cpu"))
    assert all(v.device.type == "cpu" for v in p.values())


# --------------------------------------------------------------------------- exact oracles (from mutation testing)


def _kornia_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """An independent blur: kornia's Gaussian of the same taps, edges replicated."""
    from kornia.filters import gaussian_blur2d

    return gaussian_blur2d(x, (9, 9), (sigma, sigma), border_type="replicate")


def test_blur_and_sharpening_equal_kornias_gaussian_film_by_film():
    x = torch.rand((3, 1, 12, 17), generator=torch.Generator().manual_seed(2))
    sigmas = [0.6, 1.0, 1.3]
    out = blur_batch(x, torch.tensor(sigmas))
    for i, s in enumerate(sigmas):  # each film its own kernel: a batch-wide kernel or a mixed-up film fails here
        torch.testing.assert_close(out[i : i + 1], _kornia_blur(x[i : i + 1], s), atol=1e-5, rtol=0)
    film = x[:1] * 0.5 + 0.25  # inside [0, 1] after sharpening, so no clipping hides the formula
    blurred = acquire(film, _params(blur=0.5), ALL, None)  # 0.5 > 0: a blur, even below 1
    torch.testing.assert_close(blurred, _kornia_blur(film, 0.5).clamp(0, 1), atol=1e-5, rtol=0)
    sharpened = acquire(film, _params(blur=-0.3), ALL, None)
    expected = film + 0.3 * (film - _kornia_blur(film, 0.3))
    torch.testing.assert_close(sharpened, expected.clamp(0, 1), atol=1e-5, rtol=0)


def test_contrast_alone_is_about_each_films_own_mean_and_the_result_is_clipped_below():
    films = torch.stack([torch.linspace(0.1, 0.3, 64), torch.linspace(0.6, 0.9, 64)]).view(2, 1, 8, 8)
    params = {"contrast": torch.tensor([1.5, 0.5])}
    out = acquire(films, params, ALL, None)
    for i, c in enumerate((1.5, 0.5)):
        mean = films[i].mean()
        torch.testing.assert_close(out[i], ((films[i] - mean) * c + mean).clamp(0, 1))
    dark = acquire(films[:1], _params(brightness=-0.5), ALL, None)
    assert float(dark.min()) == 0.0 and float(dark.max()) == pytest.approx(0.0)


def test_grain_is_the_generators_next_normal_draw_added():
    film = torch.full((2, 1, 6, 5), 0.5)
    out = acquire(film, {"noise": torch.tensor([0.05, 0.1])}, ALL, torch.Generator().manual_seed(4))
    grain = torch.randn(film.shape, generator=torch.Generator().manual_seed(4))
    expected = film + grain * torch.tensor([0.05, 0.1])[:, None, None, None]
    torch.testing.assert_close(out, expected.clamp(0, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_each_resampling_level_is_its_own_antialiased_round_trip(level):
    """`acquisition.resample=0.6`: levels 1, 0.8, 0.6, 0.4 of the side; a film at level i goes down to
    round(side x level) with antialiasing and back, bilinear (non-square films: each side its own)."""
    x = torch.rand((1, 1, 20, 30), generator=torch.Generator().manual_seed(level))
    factor = 1.0 - level * 0.2
    out = acquire(x, {"resample": torch.tensor([factor])}, AcquisitionRanges(resample=0.6), None)
    size = (round(20 * factor), round(30 * factor))
    small = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    back = torch.nn.functional.interpolate(small, size=(20, 30), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, back.clamp(0, 1), atol=1e-6, rtol=0)
    assert not torch.allclose(out, x, atol=1e-3), "the round trip changed the film"


def test_a_tiny_film_resamples_through_two_pixels_a_side():
    x = torch.rand((1, 1, 3, 4), generator=torch.Generator().manual_seed(0))
    out = resample_batch(x, torch.tensor([0.4]), [1.0, 0.8, 0.6, 0.4])
    small = torch.nn.functional.interpolate(x, size=(2, 2), mode="bilinear", align_corners=False, antialias=True)
    back = torch.nn.functional.interpolate(small, size=(3, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, back, atol=1e-6, rtol=0)


def test_without_a_generator_the_draws_and_the_grain_come_from_torchs_global_generator():
    torch.manual_seed(21)
    p = sample_acquisition(3, ALL, None, torch.device("cpu"))
    grain_film = acquire(torch.full((1, 1, 4, 4), 0.5), {"noise": torch.tensor([0.1])}, ALL, None)
    torch.manual_seed(21)
    u = torch.rand(9 * 3).reshape(9, 3)
    torch.testing.assert_close(p["gamma"], torch.exp(u[0] * 0.8 - 0.4))
    torch.testing.assert_close(grain_film, (0.5 + torch.randn(1, 1, 4, 4) * 0.1).clamp(0, 1))


@pytest.mark.parametrize("seeded", [True, False], ids=["cpu-generator", "global-generator"])
def test_the_acquisition_chain_and_the_lung_crop_make_every_tensor_on_the_batchs_device(seeded):
    """On the meta device (shapes, no data), as the train warp's test: a tensor made on the CPU (a `device=`
    forgotten, a `.to(device)` dropped) is refused where it meets the batch, or shows in what comes back. The
    draws themselves stay on the generator's device (a CPU generator serves any device), so a CPU-only run
    checks the CUDA placement of the whole chain; `make gpu-check` runs it on CUDA for real."""
    meta = torch.device("meta")
    generator = torch.Generator().manual_seed(0) if seeded else None
    params = sample_acquisition(4, ALL, generator, meta)
    assert set(params) == {"gamma", "contrast", "brightness", "blur", "noise", "resample", "zoom", "shift_x", "shift_y"}
    assert {k: (v.device.type, v.dtype, tuple(v.shape)) for k, v in params.items()} == {
        k: ("meta", torch.float32, (4,)) for k in params
    }
    x = torch.empty(4, 1, 12, 20, device=meta)
    films = acquire(x, params, ALL, generator)
    assert (films.device.type, films.dtype, films.shape) == ("meta", torch.float32, x.shape)
    warp = zoom_shift_matrices(params, 12, 20)
    assert (warp.device.type, warp.dtype, warp.shape) == ("meta", torch.float32, (4, 3, 3))
    boxes = lung_boxes(x, margin=0.1)
    assert (boxes.device.type, boxes.dtype, boxes.shape) == ("meta", torch.float32, (4, 4))
    crop = crop_matrices(boxes, 12, 20)
    assert (crop.device.type, crop.dtype, crop.shape) == ("meta", torch.float32, (4, 3, 3))
