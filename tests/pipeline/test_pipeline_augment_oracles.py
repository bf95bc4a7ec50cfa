"""DeviceAugment against independent oracles: edge sizes, general affine matrices, every branch of `forward`.

Written from the mutants of `pipeline/augment.py` that the first tests let live (docs/testing.md): each test
names the behaviour, and its expected values come from numpy, kornia or the definition, not from the code.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from pipeline.acquisition import AcquisitionRanges, acquire, sample_acquisition
from pipeline.augment import MEAN_1CH, STD_1CH, DeviceAugment, affine_matrices, sample_params, warp_kornia, warp_torch


def _norm(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN_1CH) / STD_1CH


def _warp(images, matrix, warp):
    with warnings.catch_warnings():  # affine_grid warns about unit-size grids, which are meant here
        warnings.simplefilter("ignore", UserWarning)
        return warp(images, None, matrix)[0]


# --- sizes with one or two pixels a side ---------------------------------------------------------------------------


@pytest.mark.parametrize("warp", [warp_torch, warp_kornia])
@pytest.mark.parametrize("height,width", [(1, 7), (7, 1), (2, 5), (5, 2), (2, 2)])
def test_flips_and_half_turns_of_one_and_two_pixel_sides_are_exact(warp, height, width):
    x = torch.rand(2, 1, height, width, generator=torch.Generator().manual_seed(height * 10 + width))
    flip = affine_matrices(torch.tensor([True, True]), torch.zeros(2), height, width)
    half_turn = affine_matrices(torch.tensor([False, False]), torch.tensor([180.0, -180.0]), height, width)
    torch.testing.assert_close(_warp(x, flip, warp), x.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(_warp(x, half_turn, warp), x.flip(-1, -2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("warp", [warp_torch, warp_kornia])
def test_a_one_pixel_wide_film_rotates_along_its_column_by_hand(warp):
    """Destination (0, y) reads the source at y' = cy + cos(a) (y - cy) (x' is off the 1-pixel column, which
    reads its only pixel): 1-D linear interpolation, zeros outside. torch's warp read x = 1 here before."""
    h = 7
    x = torch.rand(3, 1, h, 1, generator=torch.Generator().manual_seed(0))
    angles = torch.tensor([20.0, -35.0, 60.0])
    got = _warp(x, affine_matrices(torch.zeros(3, dtype=torch.bool), angles, h, 1), warp)
    ys, cy = np.arange(h), (h - 1) / 2
    for i, deg in enumerate(angles.tolist()):
        want = np.interp(cy + math.cos(math.radians(deg)) * (ys - cy), ys, x[i, 0, :, 0].numpy())
        np.testing.assert_allclose(got[i, 0, :, 0].numpy(), want, atol=1e-5)
    # and a one-pixel-high film along its row
    row = x.transpose(-1, -2)
    got = _warp(row, affine_matrices(torch.zeros(3, dtype=torch.bool), angles, 1, h), warp)
    for i, deg in enumerate(angles.tolist()):
        want = np.interp(cy + math.cos(math.radians(deg)) * (ys - cy), ys, row[i, 0, 0].numpy())
        np.testing.assert_allclose(got[i, 0, 0].numpy(), want, atol=1e-5)


@pytest.mark.parametrize("height,width", [(37, 53), (53, 37)])
def test_torch_warp_equals_kornias_for_general_affine_matrices_on_non_square_films(height, width):
    """Scale, shear and translation (determinants far from 1, x and y scaled differently): the closed-form
    inverse and the normalisation of each axis, which rotations and flips on square films do not test."""
    b = 16
    gen = torch.Generator().manual_seed(height)
    images = torch.rand(b, 1, height, width, generator=gen)
    matrix = torch.zeros(b, 2, 3)
    matrix[:, 0, 0] = 0.6 + 0.8 * torch.rand(b, generator=gen)
    matrix[:, 1, 1] = 0.6 + 0.8 * torch.rand(b, generator=gen)
    matrix[:, 0, 1] = 0.4 * torch.rand(b, generator=gen) - 0.2
    matrix[:, 1, 0] = 0.4 * torch.rand(b, generator=gen) - 0.2
    matrix[:, :, 2] = 10 * torch.rand(b, 2, generator=gen) - 5
    det = matrix[:, 0, 0] * matrix[:, 1, 1] - matrix[:, 0, 1] * matrix[:, 1, 0]
    assert (det - 1).abs().max() > 0.3
    theirs, ours = warp_kornia(images, None, matrix)[0], warp_torch(images, None, matrix)[0]
    assert (theirs - ours).abs().max() <= 2e-4
    assert theirs.abs().sum() > 0.5 * images.abs().sum()  # most of each film stays in the frame


# --- construction and input refusals, whole messages ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rotation_degrees": -1.0}, "need rotation_degrees >= 0 and 0 <= hflip_p <= 1, got -1.0, 0.5"),
        ({"hflip_p": 1.5}, "need rotation_degrees >= 0 and 0 <= hflip_p <= 1, got 10.0, 1.5"),
        ({"hflip_p": -0.1}, "need rotation_degrees >= 0 and 0 <= hflip_p <= 1, got 10.0, -0.1"),
        ({"crop": "boxes"}, "need crop in ['none', 'lungs'] and 0 <= crop_margin <= 1, got 'boxes', 0.1"),
        (
            {"crop": "lungs", "crop_margin": 1.5},
            "need crop in ['none', 'lungs'] and 0 <= crop_margin <= 1, got 'lungs', 1.5",
        ),
        ({"crop_margin": -0.1}, "need crop in ['none', 'lungs'] and 0 <= crop_margin <= 1, got 'none', -0.1"),
    ],
)
def test_each_bad_argument_is_refused_on_its_own_with_the_whole_message(kwargs, message):
    with pytest.raises(ValueError) as refused:
        DeviceAugment(train=True, **kwargs)
    assert str(refused.value) == message


def test_the_edges_of_each_range_are_accepted():
    for kwargs in (
        {"rotation_degrees": 0.0},
        {"hflip_p": 0.0},
        {"hflip_p": 1.0},
        {"crop_margin": 0.0},
        {"crop_margin": 1.0},
    ):
        DeviceAugment(train=True, **kwargs)


def test_bad_batches_are_refused_with_the_whole_message():
    aug = DeviceAugment(train=False)
    for shape in ((1, 8, 8), (2, 3, 8, 8)):
        with pytest.raises(ValueError) as refused:
            aug(torch.zeros(shape, dtype=torch.uint8))
        assert str(refused.value) == f"expected images [B,1,H,W], got {list(shape)}"
    with pytest.raises(ValueError) as refused:
        DeviceAugment(train=False, crop="lungs")(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    assert str(refused.value) == "mask_lungs and crop=lungs need masks; build shards with --include-masks"


# --- float input, eval, resize -------------------------------------------------------------------------------


def test_eval_is_only_normalisation_for_float_films_outside_the_unit_range_even_with_acquisition_set():
    """Float input is taken as already scaled (no /255), and evaluation never clips or transforms it."""
    x = torch.linspace(-0.5, 1.5, 2 * 36).view(2, 1, 6, 6)
    everything = AcquisitionRanges(gamma=0.3, contrast=0.2, brightness=0.1, blur=0.5, noise=0.02, resample=0.5)
    before = x.clone()
    y, _ = DeviceAugment(train=False, acquisition=everything, channels_last=False)(x)
    torch.testing.assert_close(y, _norm(before), atol=0, rtol=0)
    torch.testing.assert_close(x, before, atol=0, rtol=0)  # the caller's films are not divided in place


def test_a_one_film_batch_is_cropped_to_its_lungs_as_in_a_larger_batch():
    x = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    m = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    m[:, :, 2:7, 3:8] = 1  # lungs in a corner: the crop magnifies them
    aug = DeviceAugment(train=False, crop="lungs", channels_last=False)
    one, _ = aug(x[:1], m[:1])
    two, _ = aug(x, m)
    torch.testing.assert_close(one, two[:1], atol=0, rtol=0)
    assert not torch.equal(one, DeviceAugment(train=False, channels_last=False)(x[:1])[0])


def test_a_resize_to_the_stored_size_leaves_the_films_as_they_are():
    x = torch.randint(0, 256, (2, 1, 12, 12), dtype=torch.uint8)
    m = (torch.rand(2, 1, 12, 12) > 0.5).to(torch.uint8)
    same, plain = DeviceAugment(train=False, image_size=12), DeviceAugment(train=False)
    assert torch.equal(same(x, m)[0], plain(x, m)[0]) and torch.equal(same(x, m)[1], plain(x, m)[1])


# --- which draws happen, and what they do ---------------------------------------------------------------------------


def test_nothing_drawn_means_the_eval_pixels_and_no_last_params():
    x = torch.randint(0, 256, (3, 1, 10, 10), dtype=torch.uint8)
    aug = DeviceAugment(train=True, rotation_degrees=0, hflip_p=0)
    assert aug.last_params is None
    y, _ = aug(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, DeviceAugment(train=False)(x)[0]) and aug.last_params is None


def test_a_small_rotation_range_is_drawn_and_applied_with_the_matrix_it_reports():
    x = torch.randint(0, 256, (4, 1, 16, 12), dtype=torch.uint8)
    aug = DeviceAugment(train=True, rotation_degrees=0.5, hflip_p=0.0, channels_last=False)
    y, _ = aug(x, generator=torch.Generator().manual_seed(1))
    want = sample_params(4, rotation_degrees=0.5, hflip_p=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(aug.last_params["angle"], want["angle"]) and (want["angle"] != 0).all()
    matrix = aug.last_params["matrix"]
    assert matrix.shape == (4, 2, 3)
    torch.testing.assert_close(matrix, affine_matrices(want["flip"], want["angle"], 16, 12), atol=0, rtol=0)
    torch.testing.assert_close(y, _norm(warp_torch(x.float() / 255, None, matrix)[0]), atol=0, rtol=0)
    assert not torch.equal(y, DeviceAugment(train=False, channels_last=False)(x)[0])


def test_a_one_film_batch_is_augmented():
    x = torch.randint(0, 256, (1, 1, 9, 11), dtype=torch.uint8)
    y, _ = DeviceAugment(train=True, rotation_degrees=0, hflip_p=1.0)(x)
    torch.testing.assert_close(y, _norm(x.float().flip(-1) / 255), atol=1e-5, rtol=0)


def test_zoom_and_shift_alone_draw_nothing_before_them_and_compose_after_flip_and_rotation_by_hand():
    ranges = AcquisitionRanges(zoom=0.3, shift=0.2)
    x = torch.randint(0, 256, (4, 1, 15, 21), dtype=torch.uint8)
    alone = DeviceAugment(train=True, rotation_degrees=0, hflip_p=0, acquisition=ranges)
    alone(x, generator=torch.Generator().manual_seed(2))
    first = sample_acquisition(4, ranges, torch.Generator().manual_seed(2), torch.device("cpu"))
    for key in ("zoom", "shift_x", "shift_y"):
        assert torch.equal(alone.last_params[key], first[key]), key

    both = DeviceAugment(train=True, rotation_degrees=30, hflip_p=0.5, acquisition=ranges)
    both(x, generator=torch.Generator().manual_seed(4))  # two of four films flipped
    p, (h, w) = both.last_params, (15, 21)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    assert 0 < int(p["flip"].sum()) < 4
    for i in range(4):
        z, sx, sy = float(p["zoom"][i]), float(p["shift_x"][i]), float(p["shift_y"][i])
        a = math.radians(float(p["angle"][i]))
        zoom_shift = np.array([[z, 0, cx - z * cx + sx * w], [0, z, cy - z * cy + sy * h], [0, 0, 1]])
        rotate = np.array([[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0], [0, 0, 1]])
        about = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]]) @ rotate @ np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
        mirror = np.array([[-1, 0, w - 1], [0, 1, 0], [0, 0, 1]]) if bool(p["flip"][i]) else np.eye(3)
        np.testing.assert_allclose(p["matrix"][i].double().numpy(), (zoom_shift @ about @ mirror)[:2], atol=1e-4)


@pytest.mark.parametrize("b", [1, 3])
def test_intensity_alone_is_the_acquisition_chain_of_the_generators_draws(b):
    """No flip, rotation, zoom or shift: the draws start at the acquisition's, and `last_params` holds only them."""
    ranges = AcquisitionRanges(gamma=0.3, contrast=0.2, noise=0.05)
    x = torch.randint(0, 256, (b, 1, 10, 8), dtype=torch.uint8)
    aug = DeviceAugment(train=True, rotation_degrees=0, hflip_p=0, acquisition=ranges, channels_last=False)
    y, _ = aug(x, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    drawn = sample_acquisition(b, ranges, gen, torch.device("cpu"))
    torch.testing.assert_close(y, _norm(acquire(x.float() / 255, drawn, ranges, gen)), atol=0, rtol=0)
    assert set(aug.last_params) == {"gamma", "contrast"} | {"noise"}
    for key, value in drawn.items():
        assert torch.equal(aug.last_params[key], value), key
    assert not torch.equal(y, DeviceAugment(train=False, channels_last=False)(x)[0])


def test_an_empty_batch_passes_through_every_stage():
    ranges = AcquisitionRanges(zoom=0.2, gamma=0.3, noise=0.02)
    aug = DeviceAugment(train=True, acquisition=ranges, crop="lungs", image_size=8)
    y, m = aug(torch.zeros(0, 1, 12, 12, dtype=torch.uint8), torch.zeros(0, 1, 12, 12, dtype=torch.uint8))
    assert y.shape == (0, 1, 8, 8) and m.shape == (0, 1, 8, 8) and aug.last_params is None


def test_the_lung_crop_is_the_same_with_either_warp():
    size = 40
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = ((xx > 8) & (xx < 30) & (yy > 5) & (yy < 25)).to(torch.uint8)[None, None].repeat(3, 1, 1, 1)
    x = torch.randint(0, 256, (3, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = {w: DeviceAugment(train=False, crop="lungs", warp=w)(x, masks) for w in ("torch", "kornia")}
    assert (out["torch"][0] - out["kornia"][0]).abs().max() * STD_1CH <= 2e-4
    assert not torch.equal(out["torch"][0], DeviceAugment(train=False)(x)[0])  # the crop did something


@pytest.mark.parametrize("warp", ["torch", "kornia"])
@pytest.mark.parametrize(
    "recipe",
    [
        {},  # flip and rotation
        {"rotation_degrees": 0.0, "hflip_p": 0.0, "acquisition": AcquisitionRanges(zoom=0.1, shift=0.1)},
        {"acquisition": AcquisitionRanges(gamma=0.2, zoom=0.1)},
    ],
    ids=["flip-rotation", "zoom-shift-alone", "all-with-intensity"],
)
def test_the_train_warp_makes_every_tensor_on_the_batchs_device(warp, recipe):
    """On the meta device (shapes, no data), everything the warp makes is on the batch's device: a tensor
    made on the CPU (a `device=` forgotten) is refused when it meets the batch, or shows in `last_params`. This
    is how a CPU-only run checks the CUDA placement; the warp stage alone, because autocast has no meta device."""
    aug = DeviceAugment(train=True, warp=warp, **recipe)
    x = torch.empty(4, 1, 12, 20, device="meta")
    images, masks, drawn = aug._geometry(x, x, torch.Generator().manual_seed(0))
    assert images.device.type == masks.device.type == "meta" and images.shape == x.shape
    assert {k: v.device.type for k, v in aug.last_params.items()} == {k: "meta" for k in aug.last_params}
    assert set(drawn) == set(aug.last_params) - {"flip", "angle", "matrix"}
    assert aug.last_params["matrix"].shape == (4, 2, 3) and aug.last_params["angle"].dtype == torch.float32
