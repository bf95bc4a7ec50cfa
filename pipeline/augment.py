"""Device-side augmentation and normalisation ("DALI-style"): uint8 batch in, float32 batch out.

    uint8 [B,1,H,W] -> float32 [0,1] -> (data.crop=lungs) a square around the
    lungs, resampled to the film's size (`pipeline.crop`) -> (train) ONE affine
    warp per batch that combines a per-sample horizontal flip, rotation and
    (when set) zoom and shift (masks warped with the same matrices, nearest) ->
    optional resize -> (train, when set) the acquisition chain at the training
    size (`pipeline.acquisition`) -> optional lung masking -> normalise ->
    channels_last

Everything runs in float32 with autocast disabled (Kornia has dtype bugs under
fp16 autocast), on whatever device the batch is on (CPU in tests). Composing
flip and rotation into one matrix costs one warp per batch instead of one
generic augmentation call per transform. The warp is done either by plain torch
(`F.affine_grid` + `F.grid_sample`, one sampling grid shared by image and mask)
or by `kornia.geometry.transform.warp_affine` (`warp="torch" | "kornia"`): the
same matrices, the same pixels up to float32 rounding (tests/pipeline/
test_pipeline_augment.py measures how close).

Nothing here waits for the device: no host-built tensors (`torch.tensor([...],
device=cuda)` copies from pageable memory and synchronises), no `.item()`.

**1-channel ImageNet normalisation.** `timm.data.resolve_model_data_config`
returns the 3-channel ImageNet mean/std even for an `in_chans=1` model, whose
first convolution timm adapts by summing the RGB kernels. A grayscale film is
what a colour camera sees as R = G = B = Y, with luminance Y = 0.299 R + 0.587 G
+ 0.114 B (ITU-R BT.601). So:

- MEAN_1CH = sum_c w_c mean_c = 0.299*0.485 + 0.587*0.456 + 0.114*0.406 = 0.4590
- STD_1CH  = sum_c w_c std_c  = 0.299*0.229 + 0.587*0.224 + 0.114*0.225 = 0.2256

(the std of a weighted sum of perfectly correlated channels is the weighted sum
of their stds; with R = G = B that correlation is exactly 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.acquisition import AcquisitionRanges, acquire, sample_acquisition, zoom_shift_matrices
from pipeline.crop import CROPS, crop_matrices, lung_boxes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601
MEAN_1CH: float = sum(w * m for w, m in zip(LUMA_WEIGHTS, IMAGENET_MEAN))
STD_1CH: float = sum(w * s for w, s in zip(LUMA_WEIGHTS, IMAGENET_STD))


def sample_params(
    batch_size: int, *, rotation_degrees: float, hflip_p: float, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Per-sample flip flags (bool [B]) and angles (float32 [B], degrees, in [-d, d]) on the generator's device."""
    device = generator.device if generator is not None else torch.device("cpu")
    flip = torch.rand(batch_size, generator=generator, device=device) < hflip_p
    angle = (torch.rand(batch_size, generator=generator, device=device) * 2 - 1) * rotation_degrees
    return {"flip": flip, "angle": angle.float()}


def rotation_matrices(angle: torch.Tensor, cx: float, cy: float) -> torch.Tensor:
    """[B,2,3] rotations by `angle` degrees (counter-clockwise on screen) about pixel (cx, cy).

    Kornia's `get_rotation_matrix2d` at scale 1, bit for bit (the same operations in the
    same order: shift @ rotation @ scale @ inverse shift), so a run gives the same weights
    as with kornia's; written here because kornia before 0.9 builds it with a blocking
    host-to-device copy (kornia #3937), a host sync on every training step. Everything is
    filled on the device from Python scalars.
    """
    b = angle.shape[0]
    eye = torch.eye(3, device=angle.device, dtype=torch.float32).repeat(b, 1, 1)
    shift, shift_back, rot = eye.clone(), eye.clone(), eye.clone()
    shift[:, 0, 2], shift[:, 1, 2] = cx, cy
    shift_back[:, 0, 2], shift_back[:, 1, 2] = -cx, -cy
    rad = angle.float() * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    rot[:, :2, :2] = torch.stack([cos, sin, -sin, cos], dim=-1).view(b, 2, 2)
    return (shift @ rot @ eye @ shift_back)[:, :2, :]


def affine_matrices(flip: torch.Tensor, angle: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B,2,3] source->destination matrices: horizontal flip (about the centre) then rotation by `angle`.

    Pixel-centre convention of `warp_affine(align_corners=True)`: x in [0, W-1],
    so the flip is x -> (W-1) - x; positive angles rotate counter-clockwise.
    """
    b, device = flip.shape[0], angle.device
    rot = rotation_matrices(angle, (width - 1) / 2, (height - 1) / 2)  # [B,2,3]
    f = flip.to(device)
    flip_m = torch.eye(3, device=device).repeat(b, 1, 1)
    # torch.where, not boolean-mask assignment: no device->host sync on CUDA
    flip_m[:, 0, 0] = torch.where(f, -1.0, 1.0)
    flip_m[:, 0, 2] = torch.where(f, width - 1.0, 0.0)
    return rot @ flip_m


def sampling_theta(matrix: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B,2,3] `affine_grid` matrices (output -> input, normalised, align_corners=True) of pixel matrices.

    `matrix` maps source pixels to destination pixels (kornia's convention);
    `grid_sample` asks, for each output pixel, where to read: the inverse, in
    coordinates where pixel centre 0 is -1 and W-1 is +1 (x_n = x / s_x - 1,
    s = ((W-1)/2, (H-1)/2)). Closed form with Python-scalar sizes, so nothing
    is built on the host.
    """
    # A 1-pixel side reads its only pixel whatever the scale (1.0 just avoids dividing by zero), and
    # `affine_grid` gives it the one coordinate n = 0: its pixel is 0 = (W-1)/2 * (n + 1), not sx * (n + 1).
    sx, sy = (width - 1) / 2 if width > 1 else 1.0, (height - 1) / 2 if height > 1 else 1.0
    a00, a01, t0 = matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 0, 2]
    a10, a11, t1 = matrix[:, 1, 0], matrix[:, 1, 1], matrix[:, 1, 2]
    det = a00 * a11 - a01 * a10
    i00, i01, i10, i11 = a11 / det, -a01 / det, -a10 / det, a00 / det
    # source pixel = inv @ (s * (n + 1) - t); normalised source = that / s - 1
    u, v = (width - 1) / 2 - t0, (height - 1) / 2 - t1
    rows = [i00, i01 * (sy / sx), (i00 * u + i01 * v) / sx - 1, i10 * (sx / sy), i11, (i10 * u + i11 * v) / sy - 1]
    return torch.stack(rows, dim=-1).view(-1, 2, 3)


def warp_torch(
    images: torch.Tensor, masks: torch.Tensor | None, matrix: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain-torch warp: images bilinear, masks nearest, zeros outside; one sampling grid serves both."""
    b, c, h, w = images.shape
    grid = F.affine_grid(sampling_theta(matrix, h, w), [b, c, h, w], align_corners=True)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if masks is not None:
        masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return out, masks


def warp_kornia(
    images: torch.Tensor, masks: torch.Tensor | None, matrix: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kornia's `warp_affine` with the same matrices: images bilinear, masks nearest, zeros outside."""
    from kornia.geometry.transform import warp_affine  # imported only when data.warp=kornia asks for it

    size = tuple(images.shape[-2:])
    out = warp_affine(images, matrix, dsize=size, mode="bilinear", padding_mode="zeros", align_corners=True)
    if masks is not None:
        masks = warp_affine(masks, matrix, dsize=size, mode="nearest", padding_mode="zeros", align_corners=True)
    return out, masks


#: The warp implementations DeviceAugment can use (the same matrices, the same pixels up to float rounding).
WARPS = {"torch": warp_torch, "kornia": warp_kornia}
#: torch: 1.17-1.32x kornia's img/s on a 2-core CPU at 299 px and the training batch of 256 (1 or 2 threads;
#: at batch 32 with 2 threads the two are within noise); `python -m tools.bench_train` reports both as `augment`.
#: The GPU measurement is pending (`make gpu-check`). `data.warp` selects per run.
DEFAULT_WARP = "torch"
#: Where the train warp runs: "stored" (at the stored side, then the resize: the seed recipe's pixels) or
#: "training" (after the resize, at `image_size`: (stored / size)^2 times fewer pixels, the same draws).
WARP_AT = ("stored", "training")


class DeviceAugment(torch.nn.Module):
    """uint8 images (and masks) -> normalised float32 images (and float masks in {0,1}).

    After each call, `last_params` holds the sampled `flip`, `angle` and `matrix`
    (train only), so the statistics can be checked and a transform replayed.
    """

    def __init__(
        self,
        *,
        train: bool,
        rotation_degrees: float = 10.0,
        hflip_p: float = 0.5,
        image_size: int | None = None,
        mask_lungs: bool = False,
        channels_last: bool = True,
        mean: float = MEAN_1CH,
        std: float = STD_1CH,
        warp: str = DEFAULT_WARP,
        acquisition: AcquisitionRanges | None = None,
        crop: str = "none",
        crop_margin: float = 0.1,
        warp_at: str = "stored",
    ):
        super().__init__()
        if rotation_degrees < 0 or not 0.0 <= hflip_p <= 1.0:
            raise ValueError(f"need rotation_degrees >= 0 and 0 <= hflip_p <= 1, got {rotation_degrees}, {hflip_p}")
        if warp not in WARPS:
            raise ValueError(f"warp={warp!r} is not one of {sorted(WARPS)}")
        if crop not in CROPS or not 0.0 <= crop_margin <= 1.0:
            raise ValueError(f"need crop in {list(CROPS)} and 0 <= crop_margin <= 1, got {crop!r}, {crop_margin}")
        if warp_at not in WARP_AT:
            raise ValueError(f"warp_at={warp_at!r} is not one of {list(WARP_AT)}")
        self.warp, self.crop, self.crop_margin, self.warp_at = warp, crop, float(crop_margin), warp_at
        self.acquisition = acquisition or AcquisitionRanges()
        self.train_mode, self.rotation_degrees, self.hflip_p = train, float(rotation_degrees), float(hflip_p)
        self.image_size, self.mask_lungs, self.channels_last = image_size, mask_lungs, channels_last
        self.mean, self.std = float(mean), float(std)
        self.last_params: dict[str, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return (
            f"train={self.train_mode}, rotation_degrees={self.rotation_degrees}, hflip_p={self.hflip_p}, "
            f"image_size={self.image_size}, mask_lungs={self.mask_lungs}, mean={self.mean:.4f}, std={self.std:.4f}, "
            f"warp={self.warp}, warp_at={self.warp_at}, crop={self.crop}, acquisition={self.acquisition.active()}"
        )

    def _geometry(self, x, m, generator):
        """The train warp: flip and rotation (drawn first, as they always were), then zoom and shift, one matrix;
        and the acquisition parameters, drawn after them."""
        b, _, h, w = x.shape
        acq = self.acquisition
        if self.rotation_degrees > 0 or self.hflip_p > 0:
            params = sample_params(b, rotation_degrees=self.rotation_degrees, hflip_p=self.hflip_p, generator=generator)
            flip, angle = params["flip"].to(x.device), params["angle"].to(x.device)
        else:
            flip = torch.zeros(b, dtype=torch.bool, device=x.device)
            angle = torch.zeros(b, dtype=torch.float32, device=x.device)
        drawn = sample_acquisition(b, acq, generator, x.device) if acq.intensity or acq.geometry else {}
        matrix = affine_matrices(flip, angle, h, w)
        zoom_shift = zoom_shift_matrices(drawn, h, w)
        if zoom_shift is not None:
            full = torch.zeros(b, 3, 3, device=x.device)
            full[:, :2], full[:, 2, 2] = matrix, 1.0
            matrix = (zoom_shift @ full)[:, :2, :]
        x, m = WARPS[self.warp](x, m, matrix)  # called only when one of flip, rotation, zoom or shift is on
        self.last_params = {"flip": flip, "angle": angle, "matrix": matrix, **drawn}
        return x, m, drawn

    def _resize(self, x: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """To `image_size` (bilinear, antialiased; masks nearest); unchanged when already there."""
        if self.image_size is None or x.shape[-2:] == (self.image_size, self.image_size):
            return x, m
        size = (self.image_size, self.image_size)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x, None if m is None else F.interpolate(m, size=size, mode="nearest")

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected images [B,1,H,W], got {list(images.shape)}")
        if (self.mask_lungs or self.crop == "lungs") and masks is None:
            raise ValueError("mask_lungs and crop=lungs need masks; build shards with --include-masks")
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
            m = None if masks is None else masks.float()
            b, _, h, w = x.shape
            if self.crop == "lungs" and b > 0:
                boxes = lung_boxes(m, self.crop_margin)
                x, m = WARPS[self.warp](x, m, crop_matrices(boxes, h, w)[:, :2, :])
            drawn: dict[str, torch.Tensor] = {}
            acq = self.acquisition
            if self.warp_at == "training":  # resize first (antialiased, as below), then warp the smaller film
                x, m = self._resize(x, m)
            if self.train_mode and b > 0 and (self.rotation_degrees > 0 or self.hflip_p > 0 or acq.geometry):
                x, m, drawn = self._geometry(x, m, generator)
            elif self.train_mode and b > 0 and acq.intensity:
                drawn = sample_acquisition(b, acq, generator, x.device)
                self.last_params = dict(drawn)
            x, m = self._resize(x, m)
            if drawn and acq.intensity:  # at the training size: cheaper than at the stored one
                x = acquire(x, drawn, acq, generator)
            if self.mask_lungs:
                x = x * m
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        return x, m


__all__ = [
    "DeviceAugment",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LUMA_WEIGHTS",
    "MEAN_1CH",
    "STD_1CH",
    "WARPS",
    "affine_matrices",
    "rotation_matrices",
    "sample_params",
    "sampling_theta",
    "warp_kornia",
    "warp_torch",
]
