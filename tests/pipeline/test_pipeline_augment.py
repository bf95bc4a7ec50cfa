"""Device augmentation: exact flips, image/mask correspondence, parameter statistics, normalisation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline.augment import (
    MEAN_1CH,
    STD_1CH,
    WARPS,
    DeviceAugment,
    affine_matrices,
    rotation_matrices,
    sample_params,
    sampling_theta,
    warp_kornia,
    warp_torch,
)


def test_one_channel_constants_follow_timms_statistics():
    """A gray film is R=G=B=Y: timm's own 3-channel statistics of the model, weighted by BT.601 luma."""
    import timm

    cfg = timm.create_model("resnet18", pretrained=False).pretrained_cfg
    luma = (0.299, 0.587, 0.114)
    assert pytest.approx(sum(w * m for w, m in zip(luma, cfg["mean"])), abs=1e-6) == MEAN_1CH
    assert pytest.approx(sum(w * s for w, s in zip(luma, cfg["std"])), abs=1e-6) == STD_1CH
    assert (round(MEAN_1CH, 4), round(STD_1CH, 4)) == (0.4590, 0.2256)  # the figures the README states


def _unnorm(y):
    return y * STD_1CH + MEAN_1CH


def test_eval_is_only_normalisation_float32_channels_last():
    x = torch.randint(0, 256, (3, 1, 12, 12), dtype=torch.uint8)
    aug = DeviceAugment(train=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, m = aug(x)
    assert y.dtype == torch.float32 and m is None
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, (x.float() / 255 - MEAN_1CH) / STD_1CH)


def test_flip_is_exact():
    x = torch.randint(0, 256, (4, 1, 9, 11), dtype=torch.uint8)
    y, _ = DeviceAugment(train=True, rotation_degrees=0, hflip_p=1.0)(x)
    torch.testing.assert_close(_unnorm(y), torch.flip(x.float() / 255, [-1]), atol=1e-5, rtol=0)


def test_rotation_by_90_is_a_rot90():
    x = torch.randint(0, 256, (2, 1, 9, 9), dtype=torch.uint8).float()
    m = affine_matrices(torch.tensor([False, False]), torch.tensor([90.0, 90.0]), 9, 9)
    from kornia.geometry.transform import warp_affine

    y = warp_affine(x, m, dsize=(9, 9), align_corners=True)
    assert torch.allclose(y, torch.rot90(x, 1, (-2, -1)), atol=1e-3) or torch.allclose(
        y, torch.rot90(x, -1, (-2, -1)), atol=1e-3
    )


def test_mask_and_image_get_the_same_transform():
    size, b = 32, 64
    masks = torch.zeros(b, 1, size, size, dtype=torch.uint8)
    masks[:, :, 6:26, 4:13] = 1  # asymmetric: a flip or rotation left out would show
    images = (masks * 200 + 20).to(torch.uint8)
    aug = DeviceAugment(train=True, rotation_degrees=10, hflip_p=0.5, channels_last=False)
    y, m = aug(images, masks, generator=torch.Generator().manual_seed(1))
    img = _unnorm(y)
    assert m.shape == masks.shape and set(m.unique().tolist()) <= {0.0, 1.0}
    kernel = torch.ones(1, 1, 5, 5)
    inside = F.conv2d(m, kernel, padding=2) == 25  # mask 1 in a 5x5 neighbourhood
    outside = F.conv2d(m, kernel, padding=2) == 0
    assert inside.sum() > 0 and outside.sum() > 0
    assert torch.allclose(img[inside], torch.full_like(img[inside], 220 / 255), atol=1e-4)
    assert (img[outside] <= 20 / 255 + 1e-4).all()
    flipped = aug.last_params["flip"]
    assert 0 < flipped.sum() < b  # both cases were exercised
    # the mask moved: flipped samples have their mask mostly in the right half
    right = m[:, 0, :, size // 2 :].sum((-1, -2)) > m[:, 0, :, : size // 2].sum((-1, -2))
    assert torch.equal(right, flipped)


def test_flip_and_angle_statistics():
    g = torch.Generator().manual_seed(0)
    p = sample_params(20000, rotation_degrees=10, hflip_p=0.5, generator=g)
    assert 0.48 < p["flip"].float().mean() < 0.52
    assert p["angle"].abs().max() <= 10 and p["angle"].min() < -9.9 and p["angle"].max() > 9.9
    assert abs(float(p["angle"].mean())) < 0.2
    aug = DeviceAugment(train=True, rotation_degrees=5, hflip_p=0.25)
    aug(torch.zeros(4000, 1, 4, 4, dtype=torch.uint8), generator=torch.Generator().manual_seed(2))
    assert 0.22 < aug.last_params["flip"].float().mean() < 0.28
    assert aug.last_params["angle"].abs().max() <= 5


def test_seeded_generator_is_deterministic():
    x = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    aug = DeviceAugment(train=True)
    a, _ = aug(x, generator=torch.Generator().manual_seed(7))
    b, _ = aug(x, generator=torch.Generator().manual_seed(7))
    c, _ = aug(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resize_and_mask_lungs():
    x = torch.full((2, 1, 20, 20), 255, dtype=torch.uint8)
    mk = torch.zeros(2, 1, 20, 20, dtype=torch.uint8)
    mk[:, :, :, :10] = 1
    y, m = DeviceAugment(train=False, image_size=10, mask_lungs=True)(x, mk)
    assert y.shape == (2, 1, 10, 10) and m.shape == (2, 1, 10, 10)
    torch.testing.assert_close(_unnorm(y[:, :, :, :5]), torch.ones(2, 1, 10, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(_unnorm(y[:, :, :, 5:]), torch.zeros(2, 1, 10, 5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mask_lungs"):
        DeviceAugment(train=False, mask_lungs=True)(x)


# --- the plain-torch warp against kornia's, for the same matrices -------------------------------------------------


def _lung_like_masks(b: int, size: int) -> torch.Tensor:
    """Two solid ellipses: a mask with long curved edges, like the shards' lung masks."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    one = torch.zeros(size, size)
    for cx in (0.3, 0.7):
        one += (((xx - size * cx) / (size * 0.15)) ** 2 + ((yy - size * 0.5) / (size * 0.3)) ** 2 < 1).float()
    return one.clamp(max=1)[None, None].expand(b, 1, size, size).contiguous()


def _ties(matrix: torch.Tensor, size: int, tol: float = 1e-3) -> torch.Tensor:
    """[B,1,H,W] True where the sampled source point lies within `tol` px of a nearest-neighbour boundary."""
    grid = F.affine_grid(sampling_theta(matrix, size, size), [matrix.shape[0], 1, size, size], align_corners=True)
    pix = (grid + 1) / 2 * (size - 1)
    near_half = ((pix - pix.floor()) - 0.5).abs() < tol
    return near_half.any(-1)[:, None]


@pytest.mark.parametrize("size,degrees", [(299, 10.0), (299, 180.0), (64, 45.0), (37, 10.0)])
def test_torch_warp_gives_kornias_pixels_for_the_same_matrices(size, degrees):
    """Images (bilinear) within 2e-4 of [0, 1] (0.05 of a grey level; 9.5e-5 measured at 299 px on noise,
    the worst case: float32 rounding of the sampling grid times the steepest gradient); masks (nearest) equal
    except where a sample point sits on a rounding tie (|frac - 0.5| < 1e-3 px): ~7 in a million pixels of a
    noise mask, 0 or 1 pixel of a batch of lung-like masks."""
    b = 32
    gen = torch.Generator().manual_seed(size)
    images = torch.rand(b, 1, size, size, generator=gen)
    noise = (torch.rand(b, 1, size, size, generator=gen) > 0.5).float()
    params = sample_params(b, rotation_degrees=degrees, hflip_p=0.5, generator=gen)
    matrix = affine_matrices(params["flip"], params["angle"], size, size)
    for masks in (_lung_like_masks(b, size), noise):
        a, am = warp_kornia(images, masks, matrix)
        t, tm = warp_torch(images, masks, matrix)
        assert (a - t).abs().max() <= 2e-4
        differ = am != tm
        assert differ.float().mean() <= 1e-4
        assert not (differ & ~_ties(matrix, size)).any(), "a mask pixel differs away from a rounding tie"


def test_flip_only_warps_are_exact_in_both():
    x = torch.rand(4, 1, 9, 11)
    m = (torch.rand(4, 1, 9, 11) > 0.5).float()
    flip = torch.tensor([True, False, True, False])
    matrix = affine_matrices(flip, torch.zeros(4), 9, 11)
    for warp in (warp_torch, warp_kornia):
        y, ym = warp(x, m, matrix)
        torch.testing.assert_close(y, torch.where(flip[:, None, None, None], x.flip(-1), x), atol=1e-6, rtol=0)
        assert torch.equal(ym, torch.where(flip[:, None, None, None], m.flip(-1), m))


def test_device_augment_warps_agree_and_each_is_deterministic():
    x = torch.randint(0, 256, (8, 1, 48, 48), dtype=torch.uint8)
    m = _lung_like_masks(8, 48).to(torch.uint8)
    out = {}
    for warp in WARPS:
        aug = DeviceAugment(train=True, warp=warp)
        a = aug(x, m, generator=torch.Generator().manual_seed(7))
        b = aug(x, m, generator=torch.Generator().manual_seed(7))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same seed => same pixels
        out[warp] = a
    assert (_unnorm(out["torch"][0]) - _unnorm(out["kornia"][0])).abs().max() <= 2e-4
    assert torch.equal(out["torch"][1], out["kornia"][1])
    with pytest.raises(ValueError, match="warp"):
        DeviceAugment(train=True, warp="opencv")


@pytest.mark.parametrize("warp", sorted(WARPS))
def test_train_augment_builds_no_tensor_from_host_data(monkeypatch, warp):
    """`torch.tensor([...], device=cuda)` is a synchronous host->device copy: the step must not make one."""
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    aug = DeviceAugment(train=True, warp=warp)
    gen = torch.Generator().manual_seed(0)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.tensor called inside the training augmentation")

    monkeypatch.setattr(torch, "tensor", refuse)
    aug(x, x.clamp(max=1), generator=gen)


@pytest.mark.parametrize("size", [(299, 299), (40, 64)])
def test_rotation_matrices_equal_kornias(size):
    """The plain-torch rotation (no host copy) is kornia's get_rotation_matrix2d bit for bit (the same weights
    as before it replaced kornia's), centre x and y not swapped."""
    from kornia.geometry.transform import get_rotation_matrix2d

    h, w = size
    angle = torch.cat(
        [
            torch.tensor([-10.0, 0.0, 7.5, 90.0, 180.0]),
            (torch.rand(251, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 10,
        ]
    )
    center = torch.tensor([[(w - 1) / 2, (h - 1) / 2]]).repeat(len(angle), 1)
    theirs = get_rotation_matrix2d(center, angle, torch.ones(len(angle), 2))
    assert torch.equal(rotation_matrices(angle, (w - 1) / 2, (h - 1) / 2), theirs)


def test_default_warp_does_not_import_kornia(subprocess_env):
    """kornia (and its host-copying rotation matrix before 0.9) is loaded only for data.warp=kornia."""
    code = (
        "import sys, torch\n"
        "from pipeline.augment import DeviceAugment\n"
        "DeviceAugment(train=True)(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))\n"
        "print('kornia' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


@pytest.mark.parametrize("height,width", [(5, 9), (9, 5), (1, 4), (299, 128)])
def test_affine_matrices_rotate_about_the_centre_of_non_square_images(height, width):
    """A hand-built oracle: flip x -> (W-1) - x, then rotate about ((W-1)/2, (H-1)/2), counter-clockwise on
    screen (y down) for positive angles. Non-square sizes tell the centre's x from its y."""
    import math

    import numpy as np

    angles = torch.tensor([0.0, 17.0, -90.0, 33.5])
    flips = torch.tensor([False, True, False, True])
    got = affine_matrices(flips, angles, height, width).double().numpy()
    cx, cy = (width - 1) / 2, (height - 1) / 2
    for i, (deg, flip) in enumerate(zip(angles.tolist(), flips.tolist())):
        a = math.radians(deg)
        rotate = np.array([[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0], [0, 0, 1]])
        to_centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
        back = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]])
        mirror = np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]]) if flip else np.eye(3)
        want = (back @ rotate @ to_centre @ mirror)[:2]
        np.testing.assert_allclose(got[i], want, atol=1e-4)
        # the centre stays put
        np.testing.assert_allclose(got[i] @ [cx, cy, 1], [cx, cy], atol=1e-4)


# --- data.warp_at=training: resize first, then the train warp at the training size ---------------------------------


def _smooth_films(b: int, size: int) -> torch.Tensor:
    """Films without detail finer than a few pixels (where resizing first and warping first must agree)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    films = [
        0.5 + 0.4 * torch.sin(2.5 * xx + 1.7 * yy + k) * torch.exp(-(xx**2 + (yy - 0.2 * k) ** 2)) for k in range(b)
    ]
    return (torch.stack(films)[:, None] * 255).round().to(torch.uint8)


def test_warp_at_training_size_draws_the_same_and_gives_nearly_the_same_films():
    films, masks = _smooth_films(6, 96), _lung_like_masks(6, 96).to(torch.uint8)
    kw = {"train": True, "image_size": 32, "rotation_degrees": 15, "hflip_p": 0.5}
    stored = DeviceAugment(**kw)
    training = DeviceAugment(**kw, warp_at="training")
    a, ma = stored(films, masks, generator=torch.Generator().manual_seed(3))
    b, mb = training(films, masks, generator=torch.Generator().manual_seed(3))
    for key in ("flip", "angle"):
        assert torch.equal(stored.last_params[key], training.last_params[key]), key
    assert a.shape == b.shape == (6, 1, 32, 32) and mb.shape == (6, 1, 32, 32)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))  # away from the padded corners
    assert (_unnorm(a) - _unnorm(b))[inner].abs().mean() < 0.01
    dice = 2 * (ma * mb).sum() / (ma.sum() + mb.sum())
    assert dice > 0.9, "the masks follow the same transform (up to their nearest-neighbour edges)"
    assert not torch.equal(a, b), "a different computation: the test can fail"


def test_warp_at_training_size_draws_zoom_and_shift_the_same_and_crops_at_the_stored_size():
    from pipeline.acquisition import AcquisitionRanges

    films, masks = _smooth_films(4, 96), _lung_like_masks(4, 96).to(torch.uint8)
    kw = {"train": True, "image_size": 32, "acquisition": AcquisitionRanges(zoom=0.2, shift=0.1, gamma=0.3)}
    stored, training = DeviceAugment(**kw, crop="lungs"), DeviceAugment(**kw, crop="lungs", warp_at="training")
    a, _ = stored(films, masks, generator=torch.Generator().manual_seed(5))
    b, _ = training(films, masks, generator=torch.Generator().manual_seed(5))
    for key in ("flip", "angle", "zoom", "shift_x", "shift_y", "gamma"):
        assert torch.equal(stored.last_params[key], training.last_params[key]), key
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert (_unnorm(a) - _unnorm(b))[inner].abs().mean() < 0.02
    evaluation = DeviceAugment(train=False, image_size=32, crop="lungs", warp_at="training")
    plain = DeviceAugment(train=False, image_size=32, crop="lungs")
    torch.testing.assert_close(evaluation(films, masks)[0], plain(films, masks)[0], atol=0, rtol=0)


def test_warp_at_training_size_flips_exactly_and_is_refused_when_unknown():
    films = torch.randint(0, 256, (3, 1, 40, 40), dtype=torch.uint8)
    flip = DeviceAugment(train=True, rotation_degrees=0, hflip_p=1.0, image_size=20, warp_at="training")
    plain = DeviceAugment(train=False, image_size=20)
    y, _ = flip(films)
    torch.testing.assert_close(y, torch.flip(plain(films)[0], [-1]), atol=1e-5, rtol=0)
    evaluation = DeviceAugment(train=False, image_size=20, warp_at="training")
    torch.testing.assert_close(evaluation(films)[0], plain(films)[0], atol=0, rtol=0)  # no warp: no change
    with pytest.raises(ValueError, match="warp_at='somewhere' is not one of \\['stored', 'training'\\]"):
        DeviceAugment(train=True, warp_at="somewhere")
